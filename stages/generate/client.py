"""The request loop: every unit answered from the cache or the endpoint, within the rate limits, the concurrency
and the budget, with bounded retries (exponential backoff with jitter, at least the server's Retry-After on 429).

`Requester` holds one run's state; one method per concern: `attempt` (one request and what it came to),
`retry_delay` (whether and how long to wait before the next try), `record_failure`, `answer` (the loop for one unit)
and `run` (all units). openai is imported only when a request is made (`--dry-run` and `--help` stay light).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from qrb.errors import ConfigError

from . import GenerateParams
from .cache import ResponseCache
from .replies import PAIR_SCHEMA, parse_pairs
from .units import Unit, cost_usd, failure_row

log = logging.getLogger(__name__)

RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "qa_pairs", "strict": True, "schema": PAIR_SCHEMA}}


class FatalError(ConfigError):
    """An error no retry can fix (bad key, unknown model): the run stops, outputs untouched."""


class RateLimiter:
    """Sliding one-minute window over requests and (estimated) tokens; 0 disables a limit."""

    def __init__(self, rpm: int, tpm: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.events: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens = 0
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.events and self.events[0][0] <= now - 60:
                    self.tokens -= self.events.popleft()[1]
                ok_r = not self.rpm or len(self.events) < self.rpm
                ok_t = not self.tpm or self.tokens + tokens <= self.tpm or not self.events
                if ok_r and ok_t:
                    self.events.append((now, tokens))
                    self.tokens += tokens
                    return
                await asyncio.sleep(max(self.events[0][0] + 60 - now, 0.01))


@dataclasses.dataclass
class RunStats:
    api_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0       # billed this run, failed attempts included
    completion_tokens: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def cost(self, p: GenerateParams) -> float:
        return cost_usd(self.prompt_tokens, self.completion_tokens, p)

    def summary(self, p: GenerateParams) -> dict[str, Any]:
        """This run's own counters (the `this_run` metrics, less what the cache answered)."""
        return {"api_requests": self.api_requests, "retries": self.retries, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.cost(p), 6),
                "errors": dict(sorted(self.errors.items()))}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one attempt came to: a reply to keep (`value`), or why not."""

    value: dict[str, Any] | None = None
    reason: str = ""
    final: bool = False           # no retry can help (400, auth, unknown model): stop trying this unit
    again: bool = False           # try again at once, not counted as a retry (the JSON-schema fallback)
    rate_limited: bool = False    # HTTP 429: wait at least `retry_after` (when the server named one)
    retry_after: float | None = None


def error_kind(reason: str) -> str:
    """The key a failure reason is counted under in the metrics: its text before any detail."""
    return reason.split(":")[0].split(" (")[0]


def _retry_after(exc: Any) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        pass
    return None


def _scrub(text: Any, secret: str | None) -> str:
    text = " ".join(str(text).split())[:300]
    return text.replace(secret, "***") if secret else text


Progress = Callable[[Unit, "dict[str, Any] | None", RunStats], None]


class Requester:
    """One run of requests (`await Requester(...).run(units)`): the shared semaphore, rate limiter, jitter RNG
    (seeded), stats, and the answers and failures so far."""

    def __init__(self, p: GenerateParams, seed: int, client: Any, cache: ResponseCache, secret: str | None = None,
                 progress: Progress | None = None) -> None:
        self.p, self.seed, self.client, self.cache, self.secret, self.progress = p, seed, client, cache, secret, progress
        self.sem = asyncio.Semaphore(p.concurrency)
        self.limiter = RateLimiter(p.requests_per_minute, p.tokens_per_minute)
        self.rng = random.Random(seed)
        self.stats = RunStats()
        self.responses: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.use_schema = True        # until the endpoint rejects JSON-schema response_format
        self.fatal: list[str] = []    # the first is the reason the run stops
        self.preloaded: dict[str, dict[str, Any]] = {}

    def backoff(self, attempt: int) -> float:
        d = min(self.p.backoff_max_s, self.p.backoff_base_s * 2 ** attempt)
        return d / 2 + self.rng.uniform(0, d / 2)

    def stop_reason(self) -> str | None:
        """Why no further request may be sent (the run stopped, or the budget is spent), or None."""
        if self.fatal:
            return "run stopped: " + self.fatal[0]
        if self.p.max_cost_usd and self.stats.cost(self.p) > self.p.max_cost_usd:
            return f"budget exhausted: spent ${self.stats.cost(self.p):.4f} > generate.max_cost_usd"
        return None

    async def attempt(self, unit: Unit) -> Outcome:
        """One request (the caller holds a concurrency slot) and what it came to."""
        import openai

        p = self.p
        self.stats.api_requests += 1
        kwargs: dict[str, Any] = {"response_format": RESPONSE_FORMAT} if self.use_schema else {}
        try:
            resp = await self.client.chat.completions.create(
                model=p.model, messages=unit.messages, temperature=p.temperature,
                max_tokens=p.max_tokens, seed=self.seed, timeout=p.timeout_s, **kwargs)
        except openai.RateLimitError as e:
            return Outcome(reason="HTTP 429 rate limited", rate_limited=True, retry_after=_retry_after(e))
        except openai.APITimeoutError:
            return Outcome(reason=f"timed out after {p.timeout_s:g} s")
        except openai.APIConnectionError as e:
            return Outcome(reason=f"connection error: {_scrub(e, self.secret)}")
        except openai.InternalServerError as e:
            return Outcome(reason=f"HTTP {e.status_code} server error")
        except openai.BadRequestError as e:
            msg = str(e).lower()
            if self.use_schema and ("response_format" in msg or "json_schema" in msg):
                log.warning("generate: the endpoint rejects JSON-schema response_format; "
                            "falling back to prompt-only JSON and the tolerant parser")
                self.use_schema = False
                return Outcome(again=True)
            return Outcome(reason=f"HTTP 400 bad request: {_scrub(e, self.secret)}", final=True)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            self.fatal.append(f"HTTP {e.status_code} from the endpoint: {_scrub(e, self.secret)}")
            return Outcome(reason="run stopped: " + self.fatal[0], final=True)
        except openai.APIStatusError as e:
            return Outcome(reason=f"HTTP {e.status_code}: {_scrub(e, self.secret)}",
                           final=e.status_code < 500 and e.status_code not in (408, 409))
        return self.read_reply(resp)

    def read_reply(self, resp: Any) -> Outcome:
        """Bill the usage; keep the reply if it holds pairs and was not cut off."""
        usage = getattr(resp, "usage", None)
        pt = int(getattr(usage, "prompt_tokens", 0) or 0)
        ct = int(getattr(usage, "completion_tokens", 0) or 0)
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        choice = resp.choices[0] if resp.choices else None
        content = choice.message.content if choice else None
        finish = choice.finish_reason if choice else None
        if finish == "length":
            return Outcome(reason=f"truncated reply (finish_reason=length at max_tokens={self.p.max_tokens}); "
                                  "raise generate.max_tokens")
        if not parse_pairs(content):
            return Outcome(reason="reply is not valid JSON with question/answer pairs")
        return Outcome(value={"response_id": resp.id, "model": resp.model or self.p.model, "content": content,
                              "finish_reason": finish, "prompt_tokens": pt, "completion_tokens": ct})

    def retry_delay(self, outcome: Outcome, attempt: int) -> float | None:
        """Seconds to wait before the next try after failed attempt number `attempt` (0-based), or None when no
        retry is left. A 429 waits at least the server's Retry-After."""
        delay = max(outcome.retry_after or 0.0, self.backoff(attempt)) if outcome.rate_limited else None
        if attempt + 1 > self.p.max_retries:
            return None
        return delay if delay is not None else self.backoff(attempt)

    def record_failure(self, unit: Unit, attempts: int, reason: str) -> None:
        self.failures.append(failure_row(unit.doi, unit.title, reason, prompt_id=unit.prompt_id, chunk=unit.chunk,
                                         attempts=attempts))

    async def answer(self, unit: Unit) -> None:
        """Answer one unit from the cache or the endpoint, or record why it could not be."""
        if unit.key in self.preloaded:
            self.responses[unit.key] = self.preloaded[unit.key]
            return
        reason, attempts, attempt = "not attempted", 0, 0
        while attempt <= self.p.max_retries:
            stop = self.stop_reason()
            if stop:
                reason = stop
                break
            await self.limiter.acquire(unit.est_prompt_tokens + self.p.max_tokens)
            async with self.sem:
                attempts += 1
                outcome = await self.attempt(unit)
                if outcome.value is not None:
                    await self.cache.aput(unit, outcome.value)  # durable before the request counts as done
                    self.responses[unit.key] = outcome.value
                    return
            if outcome.again:
                continue
            reason = outcome.reason
            if outcome.final:
                break
            self.stats.errors[error_kind(reason)] += 1
            delay = self.retry_delay(outcome, attempt)
            attempt += 1
            if delay is not None:
                self.stats.retries += 1
                await asyncio.sleep(delay)
        self.record_failure(unit, attempts, reason)

    async def _tracked(self, unit: Unit) -> None:
        try:
            await self.answer(unit)
        finally:
            if self.progress is not None:
                self.progress(unit, self.responses.get(unit.key), self.stats)

    async def run(self, units: list[Unit]) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], RunStats]:
        """Answer every unit. Returns (responses by key, failure rows, stats); raises FatalError if the run stopped."""
        self.preloaded = self.cache.get_many({u.key for u in units})
        await asyncio.gather(*(self._tracked(u) for u in units))
        if self.fatal:
            raise FatalError(self.fatal[0])
        return self.responses, self.failures, self.stats


async def run_requests(units: list[Unit], p: GenerateParams, seed: int, client: Any, cache: ResponseCache,
                       secret: str | None = None, progress: Progress | None = None
                       ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], RunStats]:
    """Answer every unit from the cache or the endpoint. Returns (responses by key, failure rows, stats)."""
    return await Requester(p, seed, client, cache, secret, progress).run(units)
