"""Smoke-test stand-in for an OpenAI-compatible chat-completions endpoint (NOT a language model).

Run it:  `python -m standins.smoke --port 8732`  (serves on 127.0.0.1 until killed; the offline profile
`profiles/tiny.yaml` points `generate.base_url` at http://127.0.0.1:8732/v1, any API key is accepted).
In tests:

    with serve_smoke_endpoint(port=0, faults=Faults(rate_429=0.3, seed=1)) as ep:
        client = AsyncOpenAI(base_url=ep.base_url, api_key="x")
        ...
        ep.request_count, ep.requests   # what the server has seen

It speaks the chat-completions wire format the openai SDK parses (`POST /v1/chat/completions`, `GET /v1/models`;
and the Files and Batch API that generate's batch mode uses, `batches`),
and writes question/answer pairs *deterministically and extractively* from the paper that the generate stage
delimits in the user message (`<paper> ... </paper>` with `Title:` and `Abstract:` lines): the answers are
sentences of the abstract, the questions name the paper's title and a phrase of the answer sentence, and their
wording depends on the prompt's `Question focus:` line. A `Task: augment` prompt (prompts/augment.txt) gets K-1
rewordings of the pair it carries, a `Task: paraphrase` prompt (prompts/paraphrase.txt) one new question for the
pair's answer, both deterministic. Every reply is labelled: model id `qrb-smoke-extractive` and a
`system_fingerprint` saying that it is a smoke-test endpoint.

The parts: `writer` (the pure extractive QA writing), `rewriter` (the pure augment and paraphrase writing),
`completions` (request body -> chat.completion object, JSON schema or fenced JSON), `server` (HTTP routes, API key,
injectable faults and latency, a server that refuses a response_format, `serve_smoke_endpoint`, `main`).
"""

from .completions import FINGERPRINT, MODEL_ID, completion
from .rewriter import augment_variants, paraphrase_question
from .server import BANNER, Faults, SmokeEndpoint, main, serve_smoke_endpoint
from .writer import extractive_pairs, parse_user_message, split_sentences

__all__ = ["BANNER", "FINGERPRINT", "MODEL_ID", "Faults", "SmokeEndpoint", "augment_variants", "completion",
           "extractive_pairs", "main", "paraphrase_question", "parse_user_message", "serve_smoke_endpoint",
           "split_sentences"]
