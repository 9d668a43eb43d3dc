"""The optional LLM judge (`validate.judge`): each pair that passed the row checks is rated 1-5 for being answerable
from its paper and for its answer being correct by it, through any OpenAI-compatible endpoint (`qrb.llm`).

The judge writes its reason before its scores (the verdict follows from the reasoning, as distilabel and instructlab
ask), and the reply is read tolerantly (JSON bare, fenced or in prose, else `answerable: N` lines): no
`response_format` is sent, as not every server takes one. A reply without a readable verdict is asked again (up to
`max_retries`), then the pair fails as `judge_failed`. Verdicts are cached as they arrive, keyed by endpoint, model,
prompt and texts (not the threshold: re-thresholding costs nothing). The stage refuses to start when the estimated
cost (prompt characters / 4 + max_tokens a request) is above `max_cost_usd`, and never sends a request that could
take this run's spend past it. A bad key, an unknown model or an endpoint that keeps failing stops the stage with
one line; the verdicts so far stay cached (a rerun resumes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qrb import llm
from qrb.errors import ConfigError, QrbError, TransientError

from . import JudgeParams
from .features import content_tokens

log = logging.getLogger(__name__)

SYSTEM = ("You check question-answer pairs against the paper they were written from, before they are used for "
          "training. You reply with JSON only.")
EXCERPT_CHARS = 6000  # of the full text, around the passage the answer draws on (pairs written from a full-text chunk)
_DELIM = re.compile(r"<\s*/?\s*(?:paper|pair)\s*>", re.I)


def one_line(text: Any) -> str:
    """One line that cannot open or close a `<paper>` or `<pair>` block."""
    return _DELIM.sub("[data]", " ".join(str(text or "").split()))


def excerpt(full_text: str, answer: str, limit: int = EXCERPT_CHARS) -> str:
    """The paragraphs of the full text around the one sharing most content words with the answer."""
    paras = [p for p in re.split(r"\n\s*\n", full_text) if p.strip()]
    if not paras:
        return ""
    want = set(content_tokens(answer))
    best = max(range(len(paras)), key=lambda i: (len(want & set(content_tokens(paras[i]))), -i))
    lo = hi = best
    size = len(paras[best])
    grown = True
    while grown:  # widen alternately after and before the best paragraph while it fits
        grown = False
        for j in (hi + 1, lo - 1):
            if 0 <= j < len(paras) and size + len(paras[j]) <= limit:
                size += len(paras[j])
                lo, hi = min(lo, j), max(hi, j)
                grown = True
    return one_line(" ".join(paras[lo:hi + 1]))[:limit]


def paper_block(paper: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """What the judge reads of the paper: title, DOI, abstract, and for a pair written from the full text (chunk >
    0), the passage of the full text it draws on."""
    lines = ["<paper>", f"Title: {one_line(paper.get('title'))}", f"DOI: {one_line(paper.get('doi'))}", "Abstract:",
             one_line(paper.get("abstract"))]
    full = paper.get("full_text")
    if row.get("chunk") not in (0, "0", None) and isinstance(full, str) and full.strip():
        lines += ["Excerpt of the full text:", excerpt(full, str(row.get("answer") or ""))]
    return "\n".join(lines + ["</paper>"])


@dataclass(frozen=True)
class Item:
    row_id: str
    question: str
    answer: str
    paper: str  # the rendered paper block


@dataclass(frozen=True)
class Verdict:
    answerable: int | None  # 1-5; None when the judge gave no readable verdict
    correct: int | None
    reason: str             # the judge's reason, or why there is no verdict

    @property
    def ok(self) -> bool:
        return self.answerable is not None and self.correct is not None


def make_item(row_id: str, row: Mapping[str, Any], paper: Mapping[str, Any]) -> Item:
    return Item(row_id, str(row.get("question") or ""), str(row.get("answer") or ""), paper_block(paper, row))


def messages(template: str, item: Item) -> list[dict[str, str]]:
    pair = "\n".join(["<pair>", f"Question: {one_line(item.question)}", f"Answer: {one_line(item.answer)}", "</pair>"])
    user = template.replace("{{paper}}", item.paper).replace("{{pair}}", pair)
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LINE = {k: re.compile(rf"\b{k}\b\W{{0,4}}([1-5])\b", re.I) for k in ("answerable", "correct")}
_REASON = re.compile(r"\breason\b\W{0,4}(.+)", re.I)


def _score(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(round(f)) if 1 <= f <= 5 else None


def parse_verdict(text: str | None) -> tuple[int, int, str] | None:
    """(answerable, correct, reason) from a reply, or None when it holds no readable verdict."""
    text = _THINK.sub(" ", text or "")
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            low = {str(k).lower(): v for k, v in obj.items()}
            a, c = _score(low.get("answerable")), _score(low.get("correct"))
            if a is not None and c is not None:
                return a, c, " ".join(str(low.get("reason") or "").split())[:500]
    found = {k: p.search(text) for k, p in _LINE.items()}
    if all(found.values()):
        reason = _REASON.search(text)
        return (int(found["answerable"].group(1)), int(found["correct"].group(1)),
                " ".join(reason.group(1).split())[:500] if reason else "")
    return None


class Judge:
    """One run's judge: `judge(items)` -> {row_id: Verdict}; `summary()` its counters for the metrics."""

    def __init__(self, jp: JudgeParams, template: str, cache: llm.Cache,
                 env: Mapping[str, str] | None = None) -> None:
        if jp.endpoint is None:
            raise ValueError("Judge needs validate.judge.endpoint")
        self.jp, self.ep, self.template, self.cache = jp, jp.endpoint, template, cache
        self.env = os.environ if env is None else env
        self.prompt_id = hashlib.sha256((SYSTEM + "\x00" + template).encode()).hexdigest()[:16]
        self.lock = threading.Lock()
        self.requests = self.reasks = self.prompt_tokens = self.completion_tokens = 0
        self.cached = 0
        self.cost_total = 0.0
        self.reserved = 0.0
        self.stopped: list[QrbError] = []

    def key(self, item: Item) -> str:
        return llm.key(self.ep.base_url.rstrip("/"), self.ep.model, self.prompt_id, self.jp.max_tokens, item.question,
                       item.answer, item.paper)

    def cost(self, pt: int, ct: int) -> float:
        return (pt * self.jp.price_input_per_1m + ct * self.jp.price_output_per_1m) / 1e6

    @property
    def spent(self) -> float:
        return self.cost(self.prompt_tokens, self.completion_tokens)

    def bound(self, msgs: list[dict[str, str]]) -> float:
        """The most one request may cost: its estimated prompt and a full `max_tokens` reply."""
        return self.cost(sum(llm.estimate(m["content"]) for m in msgs), self.jp.max_tokens)

    def __call__(self, items: Sequence[Item]) -> dict[str, Verdict]:
        keys = {it.row_id: self.key(it) for it in items}
        have = self.cache.get_many(set(keys.values()))
        out: dict[str, Verdict] = {}
        todo: dict[str, Item] = {}
        for it in items:
            hit = have.get(keys[it.row_id])
            if hit is not None:
                out[it.row_id] = Verdict(*hit[:3])
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
            secret = llm.api_key(self.ep.api_key_env, self.env)
            if not secret:
                raise llm.missing_key(self.ep.api_key_env, "validate.judge.endpoint.api_key_env", self.ep.base_url)
            got = self._send(list(todo.items()), secret)
            for it in items:
                if it.row_id not in out:
                    out[it.row_id] = got[keys[it.row_id]]
        return out

    def _send(self, todo: list[tuple[str, Item]], secret: str) -> dict[str, Verdict]:
        with llm.client(self.ep.base_url, secret, self.jp.timeout_s, self.jp.max_retries) as client:
            verdicts, raised = llm.fan_out(lambda t: self._one(client, *t, secret), todo, self.jp.concurrency)
        if raised:  # `_one` reads every request's failure itself: this is a bug, shown as it is
            raise raised[0]
        got = {key: v for (key, _), v in zip(todo, verdicts) if v is not None}
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
                f = llm.failure(e, secret)
                with self.lock:
                    self.reserved -= bound
                    if f.kind == "request":
                        return Verdict(None, None, f.reason)
                    error = ConfigError if f.kind == "config" else TransientError
                    self.stopped.append(error(f"the judge: {f.reason}"))
                return None
            content = llm.reply_text(resp)
            pt, ct = llm.usage(resp)  # billed as estimated where the endpoint reports no usage
            pt = pt or sum(llm.estimate(m["content"]) for m in msgs)
            ct = ct if getattr(resp, "usage", None) is not None else llm.estimate(content)
            with self.lock:
                self.reserved -= bound
                self.prompt_tokens += pt
                self.completion_tokens += ct
                self.cost_total += self.cost(pt, ct)
            parsed = parse_verdict(content)
            if parsed is not None:
                self.cache.put(key, [*parsed, pt, ct])
                return Verdict(*parsed)
            why = f"the judge's reply holds no verdict: {' '.join(content.split())[:120]!r}"
        return Verdict(None, None, why)

    def summary(self) -> dict[str, Any]:
        return {"model": self.ep.model, "base_url": self.ep.base_url, "threshold": self.jp.threshold,
                "cached": self.cached, "requests": self.requests,
                "reasks": self.reasks, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cost_usd": round(self.spent, 6),
                "cost_usd_total": round(self.cost_total, 6)}
