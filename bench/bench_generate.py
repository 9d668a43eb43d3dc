"""Benchmark: generate-stage throughput at concurrency 16 vs 1 against the smoke endpoint with 200 ms latency.

Run: `python bench/bench_generate.py [--requests 64] [--latency 0.2]`. Prints the wall time of each run and the
ratio (the bar: concurrency 16 >= 12x faster than concurrency 1). Both runs go through the stage's own
request loop (`stages.generate.client.Requester`: semaphore, rate limiter, retries, SQLite cache) with an empty
cache.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.generate import GenerateParams  # noqa: E402
from stages.generate.cache import ResponseCache  # noqa: E402
from stages.generate.client import Requester  # noqa: E402
from stages.generate.run import load_templates  # noqa: E402
from stages.generate.units import build_units  # noqa: E402
from standins.smoke import MODEL_ID, Faults, serve_smoke_endpoint  # noqa: E402


def papers(n: int) -> list[dict]:
    return [{"doi": f"10.22331/q-2024-01-01-{1000 + i}", "title": f"Benchmark paper number {i} on qubit {i}",
             "published": "2024-01-01",
             "abstract": f"Paper {i} studies a qubit register of size {i}. We show a fidelity of 0.{i}. "
                         f"The register of paper {i} is defined as a chain of qubits."} for i in range(n)]


def run(concurrency: int, n_requests: int, base_url: str) -> float:
    p = GenerateParams(base_url=base_url, model=MODEL_ID, api_key_env="X", prompts=("factual",),
                       pairs_per_prompt=3, temperature=0.0, max_tokens=600, concurrency=concurrency,
                       requests_per_minute=0, tokens_per_minute=0, timeout_s=10.0, max_retries=2,
                       backoff_base_s=0.1, backoff_max_s=1.0, near_duplicate_jaccard=0.8, eval_size=0,
                       eval_max_paper_share=0.2, augment_variants=1, seen_questions=0, seen_max_jaccard=0.6,
                       abstain_share=0.0, invented_questions=0, raft_gold_share=0.0, raft_distractor_share=0.0,
                       raft_reading_share=0.0, raft_read_facts=0,
                       max_consecutive_failures=10, price_input_per_1m=0.0, price_output_per_1m=0.0,
                       max_cost_usd=0.0, mode="online", batch_price_factor=0.5, batch_poll_s=30.0,
                       batch_poll_max_s=600.0)
    system, templates = load_templates(p.prompts, ROOT / "prompts")
    units, _ = build_units(papers(n_requests), templates, system, p, seed=concurrency)
    from openai import AsyncOpenAI

    with tempfile.TemporaryDirectory() as tmp:
        cache = ResponseCache(Path(tmp) / "responses.sqlite")

        async def go() -> None:
            client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=p.timeout_s)
            responses, failures, _ = await Requester(p, 0, client, cache).run(units)
            assert len(responses) == n_requests and not failures
            await client.close()

        t0 = time.perf_counter()
        asyncio.run(go())
        elapsed = time.perf_counter() - t0
        cache.close()
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    args = ap.parse_args()
    with serve_smoke_endpoint(port=0, faults=Faults(latency_s=args.latency)) as ep:
        run(4, 4, ep.base_url)  # warm-up (imports, connection pool)
        t1 = run(1, args.requests, ep.base_url)
        t16 = run(16, args.requests, ep.base_url)
    print(f"bench_generate: {args.requests} requests at {args.latency * 1000:.0f} ms server latency")
    print(f"  concurrency 1:  {t1:.2f} s ({args.requests / t1:.1f} req/s)")
    print(f"  concurrency 16: {t16:.2f} s ({args.requests / t16:.1f} req/s)")
    print(f"  speed-up: {t1 / t16:.1f}x (bar: >= 12x)")


if __name__ == "__main__":
    main()
