"""The request loop: every unit answered from the cache or the endpoint, within the rate limits, the concurrency
and the budget, with bounded retries (exponential backoff with jitter, at least the server's Retry-After on 429).

`Requester` holds one run's state across its rounds (QA, augment, paraphrase, invent: `run` once per round): the
response_format, negotiated once per endpoint (`settle`), the circuit breaker (`record_failure`, `count_attempt`), the
answers and failures so far. A failed request is read by `qrb.llm.failure`, the layer every LLM call shares, into an
`Attempt`; the run's counters are `RunStats`. openai is imported only when a request is made (`--dry-run` and
`--help` stay light).
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

from qrb import llm
from qrb.errors import ConfigError, QrbError, TransientError

from . import GenerateParams
from .cache import ResponseCache
from .replies import PAIR_SCHEMA, parse_pairs
from .units import Unit, cost_usd, unit_failure

log = logging.getLogger(__name__)

# The response_format modes, best first: the endpoint's refusal of one moves the run to the next, once
FORMAT_MODES = ("json_schema", "json_object", "none")
_FORMAT_WORDS = ("response_format", "response format", "json_schema", "json_object")


@dataclasses.dataclass(frozen=True)
class Attempt:
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


def read_failure(e: BaseException, mode_sent: str, secret: str | None, timeout_s: float) -> Attempt:
    """A request's exception as an Attempt: retry, give up, stop the run, or a refusal of the `response_format` (an
    error naming it, whatever status code carried it)."""
    f = llm.failure(e, secret, timeout_s)
    if f.status and f.status != 429 and mode_sent != "none" and any(w in f.message.lower() for w in _FORMAT_WORDS):
        return Attempt(reason=f"HTTP {f.status} refused response_format {mode_sent}: {f.message}",
                       refused_format=True)
    return Attempt(reason=f.reason, transient=f.transient, rate_limited=f.kind == "rate_limited",
                   retry_after=f.retry_after, final=f.kind in ("config", "request"), fatal=f.kind == "config")


RESPONSE_FORMATS: dict[str, dict[str, Any] | None] = {
    "json_schema": {"type": "json_schema", "json_schema": {"name": "qa_pairs", "strict": True, "schema": PAIR_SCHEMA}},
    "json_object": {"type": "json_object"},  # the system prompt says "JSON" (OpenAI requires it for this mode)
    "none": None,                            # instructions only; the tolerant parser reads the reply
}


class RateLimiter:
    """Sliding one-minute window over requests and tokens; 0 disables a limit. Each attempt reserves its prompt
    tokens + max_tokens before it is sent (what OpenAI counts against the tokens-per-minute limit when the request
    arrives), so the requests in flight at once, however many the concurrency allows, stay within both limits."""

    def __init__(self, rpm: int, tpm: int, window_s: float = 60.0) -> None:
        self.rpm, self.tpm, self.window_s = rpm, tpm, window_s
        self.events: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens = 0
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.events and self.events[0][0] <= now - self.window_s:
                    self.tokens -= self.events.popleft()[1]
                ok_r = not self.rpm or len(self.events) < self.rpm
                ok_t = not self.tpm or self.tokens + tokens <= self.tpm or not self.events
                if ok_r and ok_t:
                    self.events.append((now, tokens))
                    self.tokens += tokens
                    return
                await asyncio.sleep(max(self.events[0][0] + self.window_s - now, 0.01))


def judge_reply(resp: Any, p: GenerateParams) -> tuple[Attempt, int, int]:
    """A chat.completion (online or from a batch's output file): (kept if it holds pairs and was not cut off, or
    why not; its prompt and completion tokens, billed either way)."""
    pt, ct = llm.usage(resp)
    choice = resp.choices[0] if resp.choices else None
    content = choice.message.content if choice else None
    finish = choice.finish_reason if choice else None
    if finish == "length":
        return Attempt(reason=f"truncated reply (finish_reason=length at max_tokens={p.max_tokens}); "
                              "raise generate.max_tokens"), pt, ct
    if not parse_pairs(content):
        return Attempt(reason="reply is not valid JSON with question/answer pairs"), pt, ct
    return Attempt(value={"response_id": resp.id, "model": resp.model or p.model, "content": content,
                          "finish_reason": finish, "prompt_tokens": pt, "completion_tokens": ct}), pt, ct


Progress = Callable[[Unit, "dict[str, Any] | None", RunStats], None]


class Requester:
    """One run of requests (`await Requester(...).run(units)`, once per round): the shared semaphore, rate limiter,
    jitter RNG (seeded), stats, the response_format mode, the circuit breaker, and the answers and failures so far."""

    def __init__(self, p: GenerateParams, seed: int, client: Any, cache: ResponseCache, secret: str | None = None
                 ) -> None:
        self.p, self.seed, self.client, self.cache, self.secret = p, seed, client, cache, secret
        self.sem = asyncio.Semaphore(p.concurrency)
        self.limiter = RateLimiter(p.requests_per_minute, p.tokens_per_minute)
        self.rng = random.Random(seed)
        self.stats = RunStats()
        self.responses: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.mode = FORMAT_MODES[0]   # the response_format sent; moves down the list on the endpoint's refusal
        self.refusals: list[dict[str, str]] = []
        self.stopped: list[QrbError] = []  # the first is the reason the run stops
        self.streak: tuple[str, int] = ("", 0)  # the breaker: (error kind, requests in a row that ended with it)
        self.attempt_streak: tuple[str, int] = ("", 0)  # ... and attempts in a row failing alike (endpoint down)
        self.preloaded: dict[str, dict[str, Any]] = {}

    def backoff(self, attempt: int) -> float:
        return llm.backoff(attempt, self.p.backoff_base_s, self.p.backoff_max_s, self.rng)

    def stop_reason(self) -> str | None:
        """Why no further request may be sent (the run stopped, or the budget is spent), or None."""
        if self.stopped:
            return "run stopped: " + str(self.stopped[0])
        if self.p.max_cost_usd and self.stats.cost(self.p) > self.p.max_cost_usd:
            return f"budget exhausted: spent ${self.stats.cost(self.p):.4f} > generate.max_cost_usd"
        return None

    def settle(self, outcome: Attempt, mode_sent: str) -> Attempt:
        """On a refusal of the mode in use, move down the response_format list, once for the run (the requests in
        flight with the same mode, refused too, are only resent), and resend."""
        if not outcome.refused_format:
            return outcome
        if mode_sent == self.mode and self.mode != FORMAT_MODES[-1]:
            self.mode = FORMAT_MODES[FORMAT_MODES.index(self.mode) + 1]
            self.refusals.append({"response_format": mode_sent, "reason": outcome.reason})
            log.warning("generate: %s; falling back to response_format %s", outcome.reason, self.mode)
        return Attempt(again=True)

    def body(self, unit: Unit) -> dict[str, Any]:
        """The chat-completions request for a unit, in the response_format mode in use (online and in a batch job
        alike, so that both get the same reply and share the cache)."""
        fmt = RESPONSE_FORMATS[self.mode]
        return {"model": self.p.model, "messages": unit.messages, "temperature": self.p.temperature,
                "max_tokens": self.p.max_tokens, "seed": self.seed, **({"response_format": fmt} if fmt else {})}

    async def attempt(self, unit: Unit) -> Attempt:
        """One request (the caller holds a concurrency slot) and what it came to."""
        import openai

        p = self.p
        mode_sent = self.mode
        self.stats.api_requests += 1
        try:
            resp = await self.client.chat.completions.create(**self.body(unit), timeout=p.timeout_s)
        except (openai.APIConnectionError, openai.APIStatusError) as e:  # time-outs included
            outcome = self.settle(read_failure(e, mode_sent, self.secret, p.timeout_s), mode_sent)
            if outcome.fatal:
                self.stopped.append(ConfigError(outcome.reason))  # no retry can fix it: outputs untouched
                return Attempt(reason="run stopped: " + outcome.reason, final=True)
            return outcome
        outcome, pt, ct = judge_reply(resp, p)  # billed either way
        self.stats.prompt_tokens += pt
        self.stats.completion_tokens += ct
        return self.settle(outcome, mode_sent)

    def retry_delay(self, outcome: Attempt, attempt: int) -> float | None:
        """Seconds to wait before the next try after failed attempt number `attempt` (0-based), or None when no
        retry is left. A 429 waits at least the server's Retry-After."""
        if attempt + 1 > self.p.max_retries:
            return None
        return max(outcome.retry_after or 0.0, self.backoff(attempt)) if outcome.rate_limited else self.backoff(attempt)

    def record_failure(self, unit: Unit, attempts: int, outcome: Attempt) -> None:
        """A unit that ended without a reply; the same error on `max_consecutive_failures` units in a row stops the
        run (a ConfigError when no retry could fix it, a TransientError when the endpoint is down or failing)."""
        self.failures.append(unit_failure(unit, outcome.reason, attempts))
        if self.stopped or not attempts or outcome.reason.startswith(("run stopped", "budget exhausted")):
            return
        self.streak = self.extend(self.streak, outcome)
        n = self.streak[1]
        if n >= self.p.max_consecutive_failures:
            what = (f"{n} requests in a row failed with the same error (generate.max_consecutive_failures): "
                    f"{outcome.reason}")
            self.stopped.append(TransientError(what + "; the endpoint is down or keeps failing") if outcome.transient
                                else ConfigError(what))

    @staticmethod
    def extend(streak: tuple[str, int], outcome: Attempt) -> tuple[str, int]:
        """A streak (error kind, how many in a row) after `outcome`."""
        kind = llm.error_kind(outcome.reason)
        return kind, streak[1] + 1 if streak[0] == kind else 1

    def count_attempt(self, outcome: Attempt) -> None:
        """An endpoint that is down fails every attempt of every request while their retries interleave: the same
        transient error (429 aside: rate limits are waited out) on K requests' worth of attempts in a row (K x (1 +
        max_retries)) stops the run before every request has burnt its retries."""
        if not outcome.transient or outcome.rate_limited or self.stopped:
            return
        self.attempt_streak = self.extend(self.attempt_streak, outcome)
        n = self.attempt_streak[1]
        if n >= self.p.max_consecutive_failures * (1 + self.p.max_retries):
            self.stopped.append(TransientError(f"{n} attempts in a row failed with the same error "
                                             f"(generate.max_consecutive_failures x (1 + max_retries)): "
                                             f"{outcome.reason}; the endpoint is down or keeps failing"))

    async def answer(self, unit: Unit) -> None:
        """Answer one unit from the cache or the endpoint, or record why it could not be."""
        if unit.key in self.preloaded:
            self.responses[unit.key] = self.preloaded[unit.key]
            return
        outcome, attempts, attempt = Attempt(reason="not attempted"), 0, 0
        while attempt <= self.p.max_retries:
            stop = self.stop_reason()
            if stop:
                outcome = Attempt(reason=stop)
                break
            await self.limiter.acquire(unit.est_prompt_tokens + self.p.max_tokens)
            async with self.sem:
                stop = self.stop_reason()  # again: the run may have stopped while this unit waited for a slot
                if stop:
                    outcome = Attempt(reason=stop)
                    break
                attempts += 1
                outcome = await self.attempt(unit)
                if outcome.value is not None:
                    self.streak = self.attempt_streak = ("", 0)  # the endpoint answered
                    await self.cache.aput(unit, outcome.value)  # durable before the request counts as done
                    self.responses[unit.key] = outcome.value
                    return
                self.count_attempt(outcome)
            if outcome.again:
                attempts -= 1  # a request the response_format refused is resent at once, not counted
                continue
            if outcome.final:
                break
            self.stats.errors[llm.error_kind(outcome.reason)] += 1
            delay = self.retry_delay(outcome, attempt)
            attempt += 1
            if delay is not None:
                self.stats.retries += 1
                await asyncio.sleep(delay)
        self.record_failure(unit, attempts, outcome)

    async def _tracked(self, unit: Unit, progress: Progress | None) -> None:
        try:
            await self.answer(unit)
        finally:
            if progress is not None:
                progress(unit, self.responses.get(unit.key), self.stats)

    async def run(self, units: list[Unit], progress: Progress | None = None
                  ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], RunStats]:
        """Answer every unit. Returns (responses by key, failure rows, stats), accumulated over this requester's
        rounds; raises the QrbError that stopped the run (a ConfigError no retry can fix, the breaker's) if one did."""
        self.preloaded = self.cache.get_many({u.key for u in units})
        await asyncio.gather(*(self._tracked(u, progress) for u in units))
        if self.stopped:
            raise self.stopped[0]
        return self.responses, self.failures, self.stats

    def summary(self) -> dict[str, Any]:
        """This run's counters and the response_format the endpoint took (None: nothing was sent)."""
        return {**self.stats.summary(self.p), "response_format": self.mode if self.stats.api_requests else None,
                "response_format_refusals": list(self.refusals)}

