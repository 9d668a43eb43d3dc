"""What one attempt came to (`Outcome`), how an HTTP error from the endpoint is read (`status_outcome`: retry, give
up, stop the run, or a refusal of the `response_format`), and the run's counters (`RunStats`). Pure: no I/O."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from . import GenerateParams
from .units import cost_usd

# The response_format modes, best first: the endpoint's refusal of one moves the run to the next, once
FORMAT_MODES = ("json_schema", "json_object", "none")
_FORMAT_WORDS = ("response_format", "response format", "json_schema", "json_object")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one attempt came to: a reply to keep (`value`), or why not."""

    value: dict[str, Any] | None = None
    reason: str = ""
    final: bool = False           # no retry can help (400, auth, unknown model): stop trying this unit
    again: bool = False           # try again at once, not counted as a retry (the response_format fallback)
    rate_limited: bool = False    # HTTP 429: wait at least `retry_after` (when the server named one)
    retry_after: float | None = None
    transient: bool = False       # the network or the endpoint failed (a later try may pass), not the request
    fatal: bool = False           # stop the whole run (bad key, unknown model)
    refused_format: bool = False  # the endpoint refused the response_format this attempt was sent with


@dataclasses.dataclass
class RunStats:
    api_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0       # billed this run, failed attempts included
    completion_tokens: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    batches_submitted: int = 0   # batch mode: Batch API jobs created this run (a resumed one is not counted)
    batch_requests: int = 0      # ... requests sent in them
    batch_answered: int = 0      # ... replies kept from them
    batch_failed: int = 0        # ... requests they reported failed or left undone (then sent online)
    batch_prompt_tokens: int = 0  # billed by batches this run, at `batch_price_factor`
    batch_completion_tokens: int = 0

    def cost(self, p: GenerateParams) -> float:
        return (cost_usd(self.prompt_tokens, self.completion_tokens, p)
                + cost_usd(self.batch_prompt_tokens, self.batch_completion_tokens, p, p.batch_price_factor))

    def summary(self, p: GenerateParams) -> dict[str, Any]:
        """This run's own counters (the `this_run` metrics, less what the cache answered)."""
        return {"api_requests": self.api_requests, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost(p), 6),
                "errors": dict(sorted(self.errors.items())),
                **({"batch": {"submitted": self.batches_submitted, "requests": self.batch_requests,
                              "answered": self.batch_answered, "failed": self.batch_failed,
                              "prompt_tokens": self.batch_prompt_tokens,
                              "completion_tokens": self.batch_completion_tokens}} if p.mode == "batch" else {})}


def error_kind(reason: str) -> str:
    """The key a failure reason is counted under in the metrics: its text before any detail."""
    return reason.split(":")[0].split(" (")[0]


def scrub(text: Any, secret: str | None) -> str:
    """One line of at most 300 characters, without the key."""
    text = " ".join(str(text).split())
    text = text.replace(secret, "***") if secret else text
    return text[:300]


def retry_after(exc: Any) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        pass
    return None


def names_format(message: str) -> bool:
    """Whether an error message is about the response_format (whatever status code carried it)."""
    low = message.lower()
    return any(w in low for w in _FORMAT_WORDS)


def status_outcome(exc: Any, mode_sent: str, secret: str | None) -> Outcome:
    """An HTTP error status from the endpoint (an `openai.APIStatusError`), read. The server's message is kept in
    the reason (without the key)."""
    code = int(getattr(exc, "status_code", 0) or 0)
    msg = scrub(exc, secret)
    if code != 429 and mode_sent != "none" and names_format(msg):
        return Outcome(reason=f"HTTP {code} refused response_format {mode_sent}: {msg}", refused_format=True)
    if code == 429:
        return Outcome(reason="HTTP 429 rate limited", rate_limited=True, retry_after=retry_after(exc),
                       transient=True)
    if code in (401, 403, 404):
        return Outcome(reason=f"HTTP {code} from the endpoint: {msg}", final=True, fatal=True)
    if code >= 500:
        return Outcome(reason=f"HTTP {code} server error: {msg}", transient=True)
    if code in (408, 409):
        return Outcome(reason=f"HTTP {code}: {msg}", transient=True)
    if code == 400:
        return Outcome(reason=f"HTTP 400 bad request: {msg}", final=True)
    return Outcome(reason=f"HTTP {code}: {msg}", final=True)
