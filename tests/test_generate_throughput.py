"""Requests in flight shaped by tokens-per-minute as well as requests-per-minute, under concurrency; prompt tokens
counted by tiktoken where the model's encoding is cached on this machine, else ~4 characters per token (never
downloaded: runs are offline)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import openai  # noqa: F401 - imported by the first request otherwise, which would delay its send time
import pytest
from generate_helpers import ROOT, fake_papers, recipe, reply

from qrb import llm
from stages.generate.client import RateLimiter, Requester
from stages.generate.run import load_templates
from stages.generate.units import build_units

GOOD = '{"pairs": [{"question": "What is the threshold of the decoder?", "answer": "It is 1.1%."}]}'


class TimedClient:
    """An AsyncOpenAI stand-in whose replies take `latency` s; records when each request was sent."""

    def __init__(self, latency: float) -> None:
        self.latency, self.sent = latency, []
        self.chat = SimpleNamespace(completions=self)

    async def create(self, **kwargs):
        self.sent.append((time.monotonic(), kwargs["messages"][-1]["content"]))
        await asyncio.sleep(self.latency)
        return reply(GOOD)


class MemoryCache:
    def get_many(self, keys):
        return {}

    async def aput(self, unit, value):
        pass


def run(p, units, window_s: float, latency: float = 0.05):
    client = TimedClient(latency)
    r = Requester(p, 1, client, MemoryCache())
    r.limiter = RateLimiter(p.requests_per_minute, p.tokens_per_minute, window_s=window_s)
    asyncio.run(r.run(units))
    return client.sent


def peak(sent: list[tuple[float, str]], weight: dict[str, int], window_s: float) -> int:
    """The most weight (by the request's user message) sent within any window of `window_s`."""
    return max(sum(weight[m] for t, m in sent if s <= t < s + window_s - 1e-3) for s, _ in sent)


def units_of(p, n: int):
    system, templates = load_templates(p.prompts, ROOT / "prompts")
    return build_units(fake_papers()[:n], templates, system, p, 1)[0]


def test_tokens_per_minute_holds_with_16_requests_in_flight():
    p = recipe(prompts=["results"], concurrency=16, requests_per_minute=0, max_retries=0, max_tokens=100)
    units = units_of(p, 24)
    cost = max(u.est_prompt_tokens for u in units) + p.max_tokens  # what each attempt reserves
    p = recipe(prompts=["results"], concurrency=16, requests_per_minute=0, max_retries=0, max_tokens=100,
               tokens_per_minute=6 * cost)  # 6 requests' worth a window: the 16 slots never all fill
    sent = run(p, units, window_s=0.4)
    assert len(sent) == 24
    reserved = {u.messages[-1]["content"]: u.est_prompt_tokens + p.max_tokens for u in units}
    assert peak(sent, reserved, 0.4) <= p.tokens_per_minute
    assert sent[-1][0] - sent[0][0] >= 3 * 0.4 * 0.9  # 24 requests at <= 6 a window take >= 3 more windows
    # without the limit the 16 slots fill at once
    free = run(recipe(prompts=["results"], concurrency=16, requests_per_minute=0, tokens_per_minute=0,
                      max_retries=0), units, window_s=0.4)
    assert max(t for t, _ in free[:16]) - min(t for t, _ in free[:16]) < 0.2


def test_requests_per_minute_holds_under_concurrency():
    p = recipe(prompts=["results"], concurrency=16, requests_per_minute=5, tokens_per_minute=0, max_retries=0)
    units = units_of(p, 12)
    sent = run(p, units, window_s=0.3)
    assert len(sent) == 12 and peak(sent, {u.messages[-1]["content"]: 1 for u in units}, 0.3) <= 5


def test_offline_without_a_cached_encoding_the_estimate_counts_and_nothing_is_downloaded(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    import requests

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(requests, "get", lambda *a, **k: pytest.fail("tiktoken tried to download an encoding"))
    llm.counter.cache_clear()
    try:
        assert llm.load_encoding("gpt-4-turbo") is None
        name, count = llm.counter("gpt-4-turbo")
        assert name == llm.ESTIMATE and count("x" * 41) == 11
        p = recipe(prompts=["results"])
        u = units_of(p, 1)[0]
        text = "".join(m["content"] for m in u.messages)
        assert u.est_prompt_tokens == -(-len(text) // 4) + 8
    finally:
        llm.counter.cache_clear()


def test_with_tiktokens_encoding_the_prompt_is_counted_by_it(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    # a byte-level encoding (one token per UTF-8 byte): what it counts differs from the estimate on any text
    enc = tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={})
    monkeypatch.setattr(llm, "load_encoding", lambda model: enc if model == "gpt-4-turbo" else None)
    llm.counter.cache_clear()
    try:
        assert llm.counter("gpt-4-turbo")[0] == "tiktoken:bytes" and llm.count("héllo", "gpt-4-turbo") == 6
        assert llm.counter("llama-3-8b")[0] == llm.ESTIMATE  # not an OpenAI model: the estimate
        p = recipe(prompts=["results"])
        u = units_of(p, 1)[0]
        text = "".join(m["content"] for m in u.messages)
        assert u.est_prompt_tokens == len(text.encode()) + 8 != -(-len(text) // 4) + 8
    finally:
        llm.counter.cache_clear()
