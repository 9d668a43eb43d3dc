"""The OpenAI-compatible client layer every LLM call goes through: generate's request loop (its own retries, under its
rate limits), the validate judge, the evaluate grader and the rivals (the SDK's bounded retries, honouring
Retry-After). openai is imported only when a request is made.

Token counts are tiktoken's where the model's encoding is in tiktoken's local cache (`TIKTOKEN_CACHE_DIR`; cache it
once with `python -c "import tiktoken; tiktoken.encoding_for_model('gpt-4-turbo')"`), else ~4 characters per token:
the encoding is never downloaded (tiktoken's download has no timeout: an offline run would hang), and models tiktoken
does not know (vLLM, Ollama, the smoke endpoint) have a tokenizer that is not OpenAI's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError
from qrb.io import open_sqlite

log = logging.getLogger(__name__)

ESTIMATE = "chars/4"


def api_key(name: str, env: Mapping[str, str] | None = None) -> str | None:
    return (os.environ if env is None else env).get(name) or None


def missing_key(name: str, param: str, base_url: str) -> ConfigError:
    return ConfigError(f"environment variable {name} is not set ({param} names the variable holding the API key for "
                       f"{base_url})")


def client(base_url: str, key: str, timeout_s: float, max_retries: int, asynchronous: bool = False) -> Any:
    """An openai client (close it, or use it as a context manager); `max_retries` are the SDK's own."""
    import openai

    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)


def scrub(text: Any, secret: str | None = None) -> str:
    """One line of at most 300 characters, without the key."""
    text = " ".join(str(text).split())
    return (text.replace(secret, "***") if secret else text)[:300]


def key(*parts: Any) -> str:
    """A cache key: the SHA-256 of the parts as JSON (what a reply depends on)."""
    return hashlib.sha256(json.dumps(list(parts)).encode()).hexdigest()


def error_kind(reason: str) -> str:
    """The key a failure reason is counted under in the metrics: its text before any detail."""
    return reason.split(":")[0].split(" (")[0]


def retry_after(exc: Any) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    with contextlib.suppress(TypeError, ValueError):
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    return None


@dataclasses.dataclass(frozen=True)
class Failure:
    """What a failed request came to. `kind`: "transient" (the network or the endpoint failed; a later try may pass),
    "rate_limited" (HTTP 429: wait at least `retry_after` where the server named it), "config" (bad key, no access,
    unknown model or URL: no retry can fix it) or "request" (the endpoint refused this one request)."""

    kind: str
    reason: str                # one line without the key
    status: int = 0            # the HTTP status, 0 when none came back
    message: str = ""          # the server's own words
    retry_after: float | None = None

    @property
    def transient(self) -> bool:
        return self.kind in ("transient", "rate_limited")


def failure(e: BaseException, secret: str | None = None, timeout_s: float | None = None) -> Failure:
    """Read an exception a request raised (after whatever retries were made)."""
    import openai

    msg = scrub(e, secret)
    if isinstance(e, openai.APITimeoutError):
        return Failure("transient", "timed out" + (f" after {timeout_s:g} s" if timeout_s else ""))
    if isinstance(e, openai.APIConnectionError):
        return Failure("transient", f"connection error: {msg}")
    if not isinstance(e, openai.APIStatusError):  # a reply the caller could not read, or a bug: named as it is
        return Failure("request", msg) if isinstance(e, ValueError) else Failure(
            "transient", f"{type(e).__name__}: {msg}")
    code = int(getattr(e, "status_code", 0) or 0)
    kind, reason = {429: ("rate_limited", "HTTP 429 rate limited"),
                    401: ("config", f"HTTP 401 from the endpoint (it rejected the API key): {msg}"),
                    403: ("config", f"HTTP 403 from the endpoint (it rejected the API key): {msg}"),
                    404: ("config", f"HTTP 404 from the endpoint (unknown model or URL): {msg}"),
                    400: ("request", f"HTTP 400 bad request: {msg}")}.get(code, ("request", f"HTTP {code}: {msg}"))
    if code >= 500:
        kind, reason = "transient", f"HTTP {code} server error: {msg}"
    elif code in (408, 409):
        kind = "transient"
    return Failure(kind, reason, code, msg, retry_after(e) if code == 429 else None)


def backoff(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: between half and all of min(max_s, base_s x 2^attempt)."""
    d = min(max_s, base_s * 2 ** attempt)
    return d / 2 + rng.uniform(0, d / 2)


def fan_out(fn: Callable[[Any], Any], items: Sequence[Any], concurrency: int
            ) -> tuple[list[Any], list[BaseException]]:
    """`fn(item)` for every item on `concurrency` threads, results in order. Once one raises, the items not started
    yet are not sent (their result is None): returns (results, what was raised)."""
    raised: list[BaseException] = []

    def one(item: Any) -> Any:
        if raised:
            return None
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 - the caller reads it (`failure`) into a skip or a stop
            raised.append(e)
            return None

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, items)), raised


def reply_text(resp: Any) -> str:
    return (resp.choices[0].message.content or "") if resp.choices else ""


def usage(resp: Any) -> tuple[int, int]:
    """(prompt, completion) tokens the endpoint billed; 0 where it reports none."""
    u = getattr(resp, "usage", None)
    return int(getattr(u, "prompt_tokens", 0) or 0), int(getattr(u, "completion_tokens", 0) or 0)


class Cache:
    """Replies by key, as JSON, in SQLite (`qrb.io.open_sqlite`: one durable commit per reply, so a rerun or a resume
    after `kill -9` repeats no request that was answered); one connection shared by the request threads."""

    def __init__(self, path: Path, table: str = "replies") -> None:
        self.db, self.table, self.lock = open_sqlite(path), table, threading.Lock()
        self.db.execute(f"CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, created REAL NOT NULL, "
                        "value TEXT NOT NULL)")
        self.db.commit()

    def keys(self) -> set[str]:
        with self.lock:
            return {r[0] for r in self.db.execute(f"SELECT key FROM {self.table}")}

    def get_many(self, keys: set[str]) -> dict[str, Any]:
        with self.lock:
            rows = self.db.execute(f"SELECT key, value FROM {self.table}").fetchall()
        return {k: json.loads(v) for k, v in rows if k in keys}

    def write(self, items: Iterable[tuple[str, Any]]) -> None:
        """Insert without committing (the caller's transaction)."""
        self.db.executemany(f"INSERT OR REPLACE INTO {self.table} (key, created, value) VALUES (?, ?, ?)",
                            [(k, time.time(), json.dumps(v, ensure_ascii=False, sort_keys=True)) for k, v in items])

    def put(self, key: str, value: Any) -> None:
        with self.lock, self.db:
            self.write([(key, value)])

    def close(self) -> None:
        with self.lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.db.close()


def estimate(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token for English)."""
    return max(1, math.ceil(len(text) / 4))


def load_encoding(model: str) -> Any | None:
    """tiktoken's encoding for `model` from its local cache, or None (an unknown model, not cached)."""
    import tiktoken
    import tiktoken.load

    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return None
    original = tiktoken.load.read_file

    def cached_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise FileNotFoundError(f"{blobpath} is not in tiktoken's cache (not downloaded: runs are offline)")
        return original(blobpath)

    tiktoken.load.read_file = cached_only
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # noqa: BLE001 - whatever stops it, the estimate stands in
        why = "it is not in tiktoken's cache" if isinstance(e, FileNotFoundError) else str(e).splitlines()[0][:200]
        log.info("counting tokens as %s, not by tiktoken's %s encoding for %s: %s", ESTIMATE, name, model, why)
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
