"""Prompt token counts for the rate limiter and the cost estimate: the model's own tokenizer (tiktoken) where its
encoding is on this machine, else ~4 characters per token.

tiktoken downloads an encoding from the internet the first time it is used and caches it (in `TIKTOKEN_CACHE_DIR`,
else a temp folder); here it is only ever read from that cache, never fetched, so an offline run neither hangs nor
fails on it (tiktoken's download has no timeout). To count with it, cache the encoding once on a machine with
internet (`python -c "import tiktoken; tiktoken.encoding_for_model('gpt-4-turbo')"` with the same
`TIKTOKEN_CACHE_DIR`). A model tiktoken does not know (vLLM, Ollama, the smoke endpoint) is counted by the estimate:
its tokenizer is not OpenAI's.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ESTIMATE = "chars/4"


def estimate(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token for English)."""
    return max(1, math.ceil(len(text) / 4))


def _cached_only(read_file: Callable[[str], bytes]) -> Callable[[str], bytes]:
    def read(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise FileNotFoundError(f"{blobpath} is not in tiktoken's cache (not downloaded: runs are offline)")
        return read_file(blobpath)
    return read


def load_encoding(model: str) -> Any | None:
    """tiktoken's encoding for `model` from its local cache, or None (no tiktoken, an unknown model, not cached)."""
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        return None
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    original = tiktoken.load.read_file
    tiktoken.load.read_file = _cached_only(original)
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - whatever stops it, the estimate stands in
        why = "it is not in tiktoken's cache" if isinstance(e, FileNotFoundError) else str(e).splitlines()[0][:200]
        log.info("generate: counting tokens as %s, not by tiktoken's %s encoding for %s: %s", ESTIMATE, name, model,
                 why)
        return None
    finally:
        tiktoken.load.read_file = original


@functools.lru_cache(maxsize=8)
def counter(model: str) -> tuple[str, Callable[[str], int]]:
    """(what counts: `tiktoken:<encoding>` or `chars/4`, the count of a text) for `model`."""
    enc = load_encoding(model)
    if enc is None:
        return ESTIMATE, estimate
    return f"tiktoken:{enc.name}", lambda text: max(1, len(enc.encode(text, disallowed_special=())))


def count(text: str, model: str) -> int:
    return counter(model)[1](text)
