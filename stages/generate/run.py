"""The generate stage's I/O (see `stages.generate`): papers + templates -> units -> cost check -> requests through the
cache and the endpoint -> `assemble` -> the files dvc.yaml declares. `--dry-run` stops after the cost estimate."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl, write_json, write_jsonl
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, SYSTEM_PROMPT, GenerateParams
from .assemble import assemble
from .cache import ResponseCache
from .client import FatalError, RunStats, run_requests
from .replies import parse_pairs
from .units import Unit, build_units, cost_usd, estimate

log = logging.getLogger(__name__)

PAPERS = Path("artifacts/scrape/papers.jsonl")
PROMPTS_DIR = Path("prompts")
OUT_DIR = Path("artifacts/generate")
TRAIN, EVAL, FAILURES = OUT_DIR / "train.jsonl", OUT_DIR / "eval.jsonl", OUT_DIR / "failures.jsonl"
CACHE_DIR = Path("cache/generate")
CACHE_DB = CACHE_DIR / "responses.sqlite"
METRICS = Path("metrics/generate.json")


def load_papers(path: Path = PAPERS) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"{path} not found: run the scrape stage first (dvc repro scrape)")
    papers = list(read_jsonl(path))
    if not all(isinstance(r, dict) for r in papers):
        raise DataError(f"{path}: every line must be a JSON object")
    return sorted(papers, key=lambda r: (r.get("doi") or "", r.get("url") or ""))


def load_templates(prompt_ids: tuple[str, ...], folder: Path = PROMPTS_DIR) -> tuple[str, dict[str, str]]:
    def read(pid: str) -> str:
        path = folder / f"{pid}.txt"
        if not path.exists():
            raise ConfigError(f"prompt template {path} not found (listed in generate.prompts)")
        return path.read_text(encoding="utf-8").strip()

    templates = {pid: read(pid) for pid in prompt_ids}
    for pid, text in templates.items():
        if "{{paper}}" not in text:
            raise ConfigError(f"{folder / (pid + '.txt')} has no {{{{paper}}}} placeholder")
    return read(SYSTEM_PROMPT), templates


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print the cost estimate; call nothing, write nothing")


class ProgressBar:
    """A tqdm bar over papers (on stderr): pairs, tokens and cost of the dataset so far, cached replies included."""

    def __init__(self, units: list[Unit], p: GenerateParams) -> None:
        from tqdm import tqdm

        self.p = p
        self.bar = tqdm(total=len({u.doi for u in units}), unit="paper", desc="generate", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5)
        self.left = collections.Counter(u.doi for u in units)
        self.pairs, self.tokens, self.cost = 0, 0, 0.0

    def __call__(self, unit: Unit, value: dict[str, Any] | None, stats: RunStats) -> None:
        p = self.p
        if value is not None:
            self.pairs += min(len(parse_pairs(value["content"])), p.pairs_per_prompt)
            self.tokens += value["prompt_tokens"] + value["completion_tokens"]
            self.cost += cost_usd(value["prompt_tokens"], value["completion_tokens"], p)
        self.left[unit.doi] -= 1
        if self.left[unit.doi] == 0:
            self.bar.update(1)
        self.bar.set_postfix(pairs=self.pairs, tokens=self.tokens, cost=f"${self.cost:.4f}",
                             spent_now=f"${stats.cost(p):.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def run(base: dict[str, Any], p: GenerateParams, args: argparse.Namespace) -> None:
    for noisy in ("httpx", "httpcore", "openai", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = base["seed"]
    papers = load_papers()
    system, templates = load_templates(p.prompts)
    units, paper_failures = build_units(papers, templates, system, p, seed)

    cache = ResponseCache(CACHE_DB) if not args.dry_run or CACHE_DB.exists() else None
    cached = cache.keys() if cache else set()
    est = estimate(units, cached, p)
    summary = (f"generate: {len(papers)} papers x {len(p.prompts)} prompts -> {est['requests']} requests "
               f"({est['requests_cached']} cached, {est['requests_to_send']} to send) to {p.model}; "
               f"estimated {est['est_prompt_tokens']} prompt + {est['est_completion_tokens']} completion tokens = "
               f"${est['est_cost_usd']:.4f} (worst case at max_tokens ${est['worst_case_cost_usd']:.4f}); "
               f"limit generate.max_cost_usd = ${p.max_cost_usd:.4f}")
    if args.dry_run:
        print(summary)
        if cache:
            cache.close()
        return
    log.info(summary)
    if est["est_cost_usd"] > p.max_cost_usd:
        cache.close()
        raise ConfigError(f"estimated cost ${est['est_cost_usd']:.4f} exceeds generate.max_cost_usd "
                          f"${p.max_cost_usd:.4f}; raise the limit or send fewer papers/prompts")
    secret = os.environ.get(p.api_key_env) or None
    if est["requests_to_send"] and not secret:
        cache.close()
        raise ConfigError(f"environment variable {p.api_key_env} is not set "
                          f"(generate.api_key_env names the variable holding the API key for {p.base_url})")

    from openai import AsyncOpenAI

    bar = ProgressBar(units, p)
    client = AsyncOpenAI(base_url=p.base_url, api_key=secret or "unused", max_retries=0, timeout=p.timeout_s)
    try:
        responses, failures, stats = asyncio.run(run_requests(units, p, seed, client, cache, secret, bar))
    except FatalError as e:
        raise FatalError(f"{e} (outputs left as they were; answered requests are cached)") from None
    finally:
        bar.close()
        cache.close()

    out = assemble(units, responses, paper_failures + failures, p, seed, n_papers=len(papers), cached=cached,
                   this_run=stats.summary(p), estimated_cost_usd=est["est_cost_usd"])
    write_jsonl(TRAIN, out.train)
    write_jsonl(EVAL, out.eval)
    write_jsonl(FAILURES, out.failures)
    write_json(METRICS, out.metrics)
    m = out.metrics
    log.info("generate: %d pairs (%d train / %d eval) from %d of %d papers; %d duplicates removed; %d failed "
             "requests; %d tokens, $%.4f", m["pairs"], m["train_pairs"], m["eval_pairs"], m["papers_with_pairs"],
             m["papers"], m["duplicates_exact"] + m["duplicates_near"], m["requests_failed"], m["total_tokens"],
             m["cost_usd"])


def main(argv: list[str] | None = None) -> None:
    import stages.generate

    run_stage(stages.generate.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv, add_arguments)
