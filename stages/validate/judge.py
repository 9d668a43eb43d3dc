"""The optional LLM judge of the validate stage (`validate.judge`): through any OpenAI-compatible endpoint, each pair
that passed the row checks is rated 1-5 for being answerable from its paper and for its answer being correct; a
pair below `threshold` on either is quarantined with the judge's own reason (the judge suite, `suite.judge_checks`).

As distilabel, instructlab and augmentoolkit do, the judge writes its reason before its scores (the verdict follows
from the reasoning, not the other way round) and the reply is read tolerantly: JSON (bare, fenced or inside prose),
else `answerable: N` / `correct: N` lines. No `response_format` is sent: not every server takes one. A reply that
holds no readable verdict is asked again (up to `max_retries`), then the pair is quarantined as `judge_failed`.

Cached and resumable like generate: every verdict is committed to cache/validate/judge.sqlite (a persistent DVC out)
as it arrives, keyed by endpoint, model, prompt and the texts judged (not the threshold: re-thresholding costs
nothing), so a rerun sends no request and a `kill -9` loses nothing that was answered. Cost = usage x prices:
the stage refuses to start when the estimate of the requests to send (prompt characters / 4 + max_tokens each)
exceeds `max_cost_usd`, and never sends a request whose bound could take this run's spend past it. The key is read
from the environment only and never written; a bad key, an unknown model or an endpoint still failing after the
SDK's bounded retries stops the stage with one line (verdicts so far stay cached). openai is imported only when a
request is made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qrb.errors import ConfigError, QrbError, TransientError

from . import JudgeParams
from .verdicts import SYSTEM, Item, Verdict, VerdictCache, messages, parse_verdict

log = logging.getLogger(__name__)


def est_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token for English), as generate's."""
    return max(1, math.ceil(len(text) / 4))


def read_error(e: BaseException, secret: str | None) -> tuple[str, str]:
    """(kind, one line without the key) for a request that failed after the SDK's retries: kind "config" (no retry
    can fix it: bad key, no access, unknown model or URL), "transient" (the endpoint is down, slow or rate limiting)
    or "pair" (the endpoint refused this one request, e.g. too long)."""
    import openai

    def line(text: Any) -> str:
        text = " ".join(str(text).split())
        return (text.replace(secret, "***") if secret else text)[:200]

    if isinstance(e, openai.APITimeoutError):
        return "transient", "requests time out (after the SDK's retries)"
    if isinstance(e, openai.APIConnectionError):
        cause = type(e.__cause__).__name__ if e.__cause__ else "connection error"
        return "transient", f"cannot connect ({cause}) after the SDK's retries"
    if isinstance(e, openai.APIStatusError):
        code = e.status_code
        msg = line(e.body.get("message") if isinstance(e.body, dict) and e.body.get("message") else e.message)
        if code in (401, 403):
            return "config", f"the endpoint rejected the API key (HTTP {code}): {msg}"
        if code == 404:
            return "config", f"HTTP 404 (unknown model or URL): {msg}"
        if code in (408, 409, 429) or code >= 500:
            return "transient", f"HTTP {code} after the SDK's retries: {msg}"
        return "pair", f"the endpoint refused the request (HTTP {code}): {msg}"
    return "transient", f"{type(e).__name__}: {line(e)}"


class Judge:
    """One run's judge: `judge(items)` -> {row_id: Verdict}; `summary()` its counters for the metrics."""

    def __init__(self, jp: JudgeParams, template: str, cache: VerdictCache,
                 env: Mapping[str, str] | None = None) -> None:
        if jp.endpoint is None:
            raise ValueError("Judge needs validate.judge.endpoint")
        self.jp, self.ep, self.template, self.cache = jp, jp.endpoint, template, cache
        self.env = os.environ if env is None else env
        self.prompt_id = hashlib.sha256((SYSTEM + "\x00" + template).encode()).hexdigest()[:16]
        self.lock = threading.Lock()
        self.requests = self.reasks = self.prompt_tokens = self.completion_tokens = 0
        self.cached = self.judged = 0
        self.cost_total = 0.0
        self.reserved = 0.0
        self.stopped: list[QrbError] = []

    def key(self, item: Item) -> str:
        blob = json.dumps([self.ep.base_url.rstrip("/"), self.ep.model, self.prompt_id, self.jp.max_tokens,
                           item.question, item.answer, item.paper])
        return hashlib.sha256(blob.encode()).hexdigest()

    def cost(self, pt: int, ct: int) -> float:
        return (pt * self.jp.price_input_per_1m + ct * self.jp.price_output_per_1m) / 1e6

    @property
    def spent(self) -> float:
        return self.cost(self.prompt_tokens, self.completion_tokens)

    def bound(self, msgs: list[dict[str, str]]) -> float:
        """The most one request may cost: its estimated prompt and a full `max_tokens` reply."""
        return self.cost(sum(est_tokens(m["content"]) for m in msgs), self.jp.max_tokens)

    def __call__(self, items: Sequence[Item]) -> dict[str, Verdict]:
        keys = {it.row_id: self.key(it) for it in items}
        have = self.cache.get_many(set(keys.values()))
        out: dict[str, Verdict] = {}
        todo: dict[str, Item] = {}
        for it in items:
            hit = have.get(keys[it.row_id])
            if hit is not None:
                out[it.row_id] = Verdict(hit[0], hit[1], hit[2], cached=True)
                self.cached += 1
                self.cost_total += self.cost(hit[3], hit[4])
            else:
                todo.setdefault(keys[it.row_id], it)  # one request per distinct text judged
        est = sum(self.bound(messages(self.template, it)) for it in todo.values())
        log.info("judge %s: %d pairs, %d verdicts cached, %d requests to send (estimated at most $%.4f)",
                 self.ep.model, len(items), self.cached, len(todo), est)
        if todo:
            if est > self.jp.max_cost_usd:
                raise ConfigError(f"the judge's {len(todo)} requests are estimated at up to ${est:.4f}, above "
                                  f"validate.judge.max_cost_usd ${self.jp.max_cost_usd:.4f}: raise the limit or judge "
                                  "fewer pairs (no request was sent)")
            secret = self.env.get(self.ep.api_key_env)
            if not secret:
                raise ConfigError(f"environment variable {self.ep.api_key_env} is not set (validate.judge.endpoint."
                                  f"api_key_env names the variable holding the API key for {self.ep.base_url})")
            got = self._send(list(todo.items()), secret)
            for it in items:
                if it.row_id not in out:
                    out[it.row_id] = got[keys[it.row_id]]
        self.judged += len(items)
        return out

    def _send(self, todo: list[tuple[str, Item]], secret: str) -> dict[str, Verdict]:
        import openai

        client = openai.OpenAI(base_url=self.ep.base_url, api_key=secret, timeout=self.jp.timeout_s,
                               max_retries=self.jp.max_retries)
        got: dict[str, Verdict] = {}
        try:
            with ThreadPoolExecutor(max_workers=self.jp.concurrency) as pool:
                for key, verdict in zip((k for k, _ in todo), pool.map(lambda t: self._one(client, *t, secret),
                                                                       todo)):
                    if verdict is not None:
                        got[key] = verdict
        finally:
            client.close()
        if self.stopped:
            n = sum(v.ok for v in got.values())
            raise type(self.stopped[0])(f"{self.stopped[0]} ({n} new verdicts cached: a rerun resumes)")
        return got

    def _one(self, client: Any, key: str, item: Item, secret: str) -> Verdict | None:
        msgs = messages(self.template, item)
        why = "no reply"
        for attempt in range(1 + self.jp.max_retries):
            with self.lock:
                if self.stopped:
                    return None
                bound = self.bound(msgs)
                if self.spent + self.reserved + bound > self.jp.max_cost_usd:
                    self.stopped.append(ConfigError(
                        f"validate.judge.max_cost_usd ${self.jp.max_cost_usd:.4f} reached: spent ${self.spent:.4f}, "
                        f"the next request could cost ${bound:.4f}; raise the limit and rerun"))
                    return None
                self.reserved += bound
                self.requests += 1
                self.reasks += attempt > 0
            try:
                resp = client.chat.completions.create(model=self.ep.model, messages=msgs, temperature=0.0,
                                                      max_tokens=self.jp.max_tokens)
            except Exception as e:  # noqa: BLE001 - read into a per-pair failure or a stop of the run
                kind, msg = read_error(e, secret)
                with self.lock:
                    self.reserved -= bound
                    if kind == "pair":
                        return Verdict(None, None, msg)
                    self.stopped.append((ConfigError if kind == "config" else TransientError)(f"the judge: {msg}"))
                return None
            content = (resp.choices[0].message.content or "") if resp.choices else ""
            usage = getattr(resp, "usage", None)  # billed as estimated where the endpoint reports no usage
            pt = int(getattr(usage, "prompt_tokens", 0) or 0) or sum(est_tokens(m["content"]) for m in msgs)
            ct = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else est_tokens(content)
            with self.lock:
                self.reserved -= bound
                self.prompt_tokens += pt
                self.completion_tokens += ct
                self.cost_total += self.cost(pt, ct)
            parsed = parse_verdict(content)
            if parsed is not None:
                self.cache.put(key, item.doi, parsed, pt, ct, str(getattr(resp, "id", "") or ""))
                return Verdict(*parsed)
            why = f"the judge's reply holds no verdict: {' '.join(content.split())[:120]!r}"
        return Verdict(None, None, why)

    def summary(self) -> dict[str, Any]:
        return {"model": self.ep.model, "base_url": self.ep.base_url, "threshold": self.jp.threshold,
                "cached": self.cached, "requests": self.requests,
                "reasks": self.reasks, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.spent, 6),
                "cost_usd_total": round(self.cost_total, 6)}
