"""Smoke-test stand-in for an OpenAI-compatible chat-completions endpoint (NOT a language model).

Run it:  `python -m standins.smoke --port 8732`  (serves on 127.0.0.1 until killed; `profiles/tiny.yaml` points
`generate.base_url` at it; any API key is accepted). In tests:

    with serve_smoke_endpoint(port=0, faults=Faults(rate_429=0.3, seed=1)) as ep:
        client = AsyncOpenAI(base_url=ep.base_url, api_key="x")
        ...
        ep.request_count, ep.requests   # what the server has seen

It speaks the wire format the openai SDK parses (chat completions, models, and the Files and Batch API of generate's
batch mode) and writes deterministically from the prompt: QA pairs are sentences of the delimited abstract
(`writer`, `facts`), augment/paraphrase prompts get rewordings (`rewriter`), judge and grade prompts a verdict.
Every reply is labelled: model id `qrb-smoke-extractive` and a `system_fingerprint` saying it is a smoke test.
"""

from .completions import FINGERPRINT, MODEL_ID, completion
from .server import Faults, main, serve_smoke_endpoint
from .writer import extractive_pairs, split_sentences

__all__ = ["FINGERPRINT", "MODEL_ID", "Faults", "completion", "extractive_pairs", "main", "serve_smoke_endpoint",
           "split_sentences"]
