"""The generate stage's I/O (see `stages.generate`): papers + templates -> QA units -> cost check -> three rounds of
requests through the cache and the endpoint (QA; augment the training facts; paraphrase a sample of them) ->
`assemble` -> the files dvc.yaml declares. `--dry-run` stops after the cost estimate."""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import sys
from pathlib import Path
from typing import Any

from qrb import llm
from qrb.errors import ConfigError, DataError, QrbError
from qrb.io import read_jsonl, write_jsonl, write_metrics
from qrb.retrieval import RetrievalParams
from qrb.stage import load_section, run_stage

from . import AUGMENT, BASE_KEYS, INVENT, PARAMS_CLASS, PARAPHRASE, SECTION, SYSTEM_PROMPT, GenerateParams
from .assemble import Assembled, assemble
from .batch import Batcher
from .cache import ResponseCache
from .client import Requester, RunStats
from .plan import describe, plan, rounds, total
from .raft import raft_rows, reading_rows
from .replies import parse_pairs
from .units import Unit, build_units, reply_cost

log = logging.getLogger(__name__)

PAPERS = Path("artifacts/scrape/papers.jsonl")
PROMPTS_DIR = Path("prompts")
OUT_DIR = Path("artifacts/generate")
TRAIN, EVAL, FAILURES = OUT_DIR / "train.jsonl", OUT_DIR / "eval.jsonl", OUT_DIR / "failures.jsonl"
SEEN, INVENTED = OUT_DIR / "seen.jsonl", OUT_DIR / "invented.jsonl"
CACHE_DIR = Path("cache/generate")
CACHE_DB = CACHE_DIR / "responses.sqlite"
METRICS = Path("metrics/generate.json")  # the headline numbers (dvc metrics); the whole record in REPORT
REPORT = Path("reports/generate.json")
HEADLINE = ("facts", "pairs", "train_pairs", "eval_pairs", "seen_kept", "abstain_pairs", "invented_kept", "requests",
            "requests_failed", "cost_usd")


def load_papers(path: Path = PAPERS) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"{path} not found: run the scrape stage first (dvc repro scrape)")
    papers = list(read_jsonl(path))
    if not all(isinstance(r, dict) for r in papers):
        raise DataError(f"{path}: every line must be a JSON object")
    return sorted(papers, key=lambda r: (r.get("doi") or "", r.get("url") or ""))


def _read(folder: Path, pid: str, placeholder: str, why: str) -> str:
    path = folder / f"{pid}.txt"
    if not path.exists():
        raise ConfigError(f"prompt template {path} not found ({why})")
    text = path.read_text(encoding="utf-8").strip()
    if placeholder and placeholder not in text:
        raise ConfigError(f"{path} has no {placeholder} placeholder")
    return text


def load_templates(prompt_ids: tuple[str, ...], folder: Path = PROMPTS_DIR) -> tuple[str, dict[str, str]]:
    templates = {pid: _read(folder, pid, "{{paper}}", "listed in generate.prompts") for pid in prompt_ids}
    return _read(folder, SYSTEM_PROMPT, "", "the system prompt of every request"), templates


def load_fact_templates(p: GenerateParams, folder: Path = PROMPTS_DIR) -> dict[str, str]:
    """The fact-level templates the params turn on (a missing one is an error naming the param)."""
    wanted = {AUGMENT: (p.augment_variants > 1, "generate.augment_variants > 1"),
              PARAPHRASE: (p.seen_questions > 0, "generate.seen_questions > 0"),
              INVENT: (p.abstain_share > 0 or p.invented_questions > 0,
                       "generate.abstain_share or generate.invented_questions > 0")}
    return {name: _read(folder, name, "{{pair}}", why) for name, (on, why) in wanted.items() if on}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print the cost estimate; call nothing, write nothing")


class ProgressBar:
    """A tqdm bar (on stderr) over one round's papers (QA) or facts: pairs, tokens and cost of the dataset so far,
    cached replies included."""

    def __init__(self, units: list[Unit], p: GenerateParams, desc: str, per_reply: int) -> None:
        from tqdm import tqdm

        self.p, self.per_reply = p, per_reply
        self.group = (lambda u: u.doi) if desc == "generate" else (lambda u: u.fact_id)
        self.left = collections.Counter(self.group(u) for u in units)
        self.bar = tqdm(total=len(self.left), unit="paper" if desc == "generate" else "fact", desc=desc,
                        file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
        self.pairs, self.tokens, self.cost = 0, 0, 0.0

    def __call__(self, unit: Unit, value: dict[str, Any] | None, stats: RunStats) -> None:
        p = self.p
        if value is not None:
            self.pairs += min(len(parse_pairs(value["content"])), self.per_reply)
            self.tokens += value["prompt_tokens"] + value["completion_tokens"]
            self.cost += reply_cost(value, p)
        self.left[self.group(unit)] -= 1
        if self.left[self.group(unit)] == 0:
            self.bar.update(1)
        self.bar.set_postfix(pairs=self.pairs, tokens=self.tokens, cost=f"${self.cost:.4f}",
                             spent_now=f"${stats.cost(p):.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


async def _rounds(requester: Requester, units: list[Unit], p: GenerateParams, seed: int, system: str,
                  fact_templates: dict[str, str], papers: list[dict[str, Any]]
                  ) -> tuple[list[Unit], list[Unit], list[Unit]]:
    """`plan.rounds`, each answered (in batch mode by one Batch API job first, then online for what it did not
    answer). Returns (augment, paraphrase, invent) units."""
    batcher = Batcher(requester) if p.mode == "batch" else None
    later = rounds(units, requester.responses, p, seed, system, fact_templates, papers)
    while True:
        try:
            name, round_units, per_reply = next(later)
        except StopIteration as done:
            return done.value
        if batcher is not None:
            await batcher.run(round_units)  # what the job answers is cached; the online pass sends the rest
        bar = ProgressBar(round_units, p, "generate" if name == "qa" else name, per_reply)
        try:
            await requester.run(round_units, bar)
        finally:
            bar.close()


def _no_pairs(out: Assembled) -> DataError:
    reasons = collections.Counter(llm.error_kind(f["reason"]) for f in out.failures)
    top = "; ".join(f"{k} x{n}" for k, n in reasons.most_common(2))
    example = next((f["reason"] for f in out.failures if f["reason"].startswith(reasons.most_common(1)[0][0])), "") \
        if reasons else ""
    m = out.metrics
    return DataError(f"0 pairs from {m['papers']} papers ({m['requests_failed']} of {m['requests']} requests failed"
                     + (f"; most often: {top}; e.g. {example}" if reasons else "") + "); outputs left as they were")


def run(base: dict[str, Any], p: GenerateParams, args: argparse.Namespace) -> None:
    for noisy in ("httpx", "httpcore", "openai", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = base["seed"]
    papers = load_papers()
    system, templates = load_templates(p.prompts)
    fact_templates = load_fact_templates(p)
    units, paper_failures = build_units(papers, templates, system, p, seed)

    cache = ResponseCache(CACHE_DB) if not args.dry_run or CACHE_DB.exists() else None
    try:
        cached = cache.keys() if cache else set()
        planned = plan(units, cache.get_many if cache else (lambda keys: {}), cached, p, seed, system, fact_templates,
                       papers)
        est = total(planned)
        summary = describe(planned, p, len(papers))
        if args.dry_run:
            print(summary)
            return
        log.info(summary)
        if est["est_cost_usd"] > p.max_cost_usd:
            raise ConfigError(f"estimated cost ${est['est_cost_usd']:.4f} exceeds generate.max_cost_usd "
                              f"${p.max_cost_usd:.4f}; raise the limit or send fewer papers/prompts/variants")
        secret = llm.api_key(p.api_key_env)
        if est["requests_to_send"] and not secret:
            raise llm.missing_key(p.api_key_env, "generate.api_key_env", p.base_url)
        client = llm.client(p.base_url, secret or "unused", p.timeout_s, 0, asynchronous=True)  # the loop retries
        requester = Requester(p, seed, client, cache, secret)
        try:
            aug, para, inv = asyncio.run(_rounds(requester, units, p, seed, system, fact_templates, papers))
        except QrbError as e:
            raise type(e)(f"{e} (outputs left as they were; answered requests are cached)") from None
    finally:
        if cache:
            cache.close()

    out = assemble(units, requester.responses, paper_failures + requester.failures, p, seed, n_papers=len(papers),
                   cached=cached, this_run=requester.summary(), estimated_cost_usd=est["est_cost_usd"],
                   augment=aug, paraphrase=para, invent=inv)
    if not out.train and not out.eval:
        raise _no_pairs(out)
    if p.raft_gold_share or p.raft_distractor_share or p.raft_reading_share or out.practice:  # excerpts as the apps show
        _, rp = load_section("retrieval", RetrievalParams)
        held = {r["doi"] for r in out.eval}
        if p.raft_reading_share:
            out.train, out.seen, counts = reading_rows(out.train, out.seen, held, papers, p.raft_reading_share,
                                                       rp.top_k, rp.max_chars, seed)
            out.metrics.update(counts, seen_kept=len(out.seen))
        raft, counts = raft_rows(out.train, held, papers, p.raft_gold_share, p.raft_distractor_share, rp.top_k,
                                 rp.max_chars, seed)
        # the reading practice: each further fact over its paper's excerpt, cited (RAFT's gold rows, one wording)
        practice, _ = raft_rows(out.practice, held, papers, 1.0, 0.0, rp.top_k, rp.max_chars, seed,
                                {r["doi"] for r in out.train if r.get("doi")})
        out.train += raft + practice
        counts["raft_practice_rows"] = len(practice)
        out.metrics.update(counts, train_pairs=len(out.train), pairs=len(out.train) + len(out.eval))
    for path, rows in ((TRAIN, out.train), (EVAL, out.eval), (SEEN, out.seen), (INVENTED, out.invented),
                       (FAILURES, out.failures)):
        write_jsonl(path, rows)
    write_metrics(METRICS, REPORT, out.metrics, HEADLINE)
    m = out.metrics
    log.info("generate: %d facts (%d train / %d eval) from %d of %d papers; %d training pairs with %d variants; "
             "%d seen questions kept, %d dropped as near-duplicates; %d duplicates removed; %d failed requests; "
             "%d tokens, $%.4f; response_format %s", m["facts"], m["train_facts"], m["eval_facts"],
             m["papers_with_pairs"], m["papers"], m["train_pairs"], m["variants"], m["seen_kept"],
             m["seen_dropped_near_duplicate"], m["duplicates_exact"] + m["duplicates_near"], m["requests_failed"],
             m["total_tokens"], m["cost_usd"], m["this_run"]["response_format"])


def main(argv: list[str] | None = None) -> None:
    import stages.generate

    run_stage(stages.generate.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv, add_arguments)
