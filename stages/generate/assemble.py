"""Pure post-processing: the answered units -> train/eval rows (deduplicated, split by paper), the failure rows and
the metrics. No I/O: `run` writes what `assemble` returns."""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import unicodedata
import zlib
from typing import Any

from qrb.schema import QAPair

from . import GenerateParams
from .replies import parse_pairs
from .units import Unit, cost_usd, failure_row


@dataclasses.dataclass
class Assembled:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    metrics: dict[str, Any]


def rows_from_responses(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams
                        ) -> list[dict[str, Any]]:
    """The pairs of every answered unit, as QAPair records, in (paper, chunk, prompt) order."""
    order = {pid: i for i, pid in enumerate(p.prompts)}
    rows = []
    for unit in sorted(units, key=lambda u: (u.doi, u.chunk, order[u.prompt_id])):
        value = responses.get(unit.key)
        if value is None:
            continue
        for pair in parse_pairs(value["content"])[:p.pairs_per_prompt]:
            rows.append(QAPair(question=pair["question"], answer=pair["answer"], doi=unit.doi, title=unit.title,
                               published=unit.published, prompt_id=unit.prompt_id, model=value["model"],
                               response_id=value["response_id"], chunk=unit.chunk).record())
    return rows


def _norm_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[^\W_]+", text)


def dedup_questions(rows: list[dict[str, Any]], threshold: float) -> tuple[list[dict[str, Any]], int, int]:
    """Drop exact (after normalisation) and near-duplicate questions (word-set Jaccard >= threshold), keeping the
    first. Near-duplicate candidates come from MinHash banding, then are verified exactly."""
    kept: list[dict[str, Any]] = []
    kept_sets: list[frozenset[str]] = []
    exact: set[str] = set()
    buckets: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)
    n_exact = n_near = 0
    n_hash, rows_per_band = 24, 2
    for row in rows:
        words = _norm_words(row["question"])
        norm = " ".join(words)
        if norm in exact:
            n_exact += 1
            continue
        wset = frozenset(words) or frozenset([norm])
        sig = [min(zlib.crc32(f"{i}:{w}".encode()) for w in wset) for i in range(n_hash)]
        bands = [(b, sig[b * rows_per_band], sig[b * rows_per_band + 1]) for b in range(n_hash // rows_per_band)]
        candidates = {j for band in bands for j in buckets.get(band, ())}
        if any(len(wset & kept_sets[j]) / len(wset | kept_sets[j]) >= threshold for j in candidates):
            n_near += 1
            continue
        exact.add(norm)
        idx = len(kept)
        kept.append(row)
        kept_sets.append(wset)
        for band in bands:
            buckets[band].append(idx)
    return kept, n_exact, n_near


def split_by_paper(rows: list[dict[str, Any]], eval_size: int, seed: int
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Whole papers go to eval (in a seeded order) while that brings its size closer to `eval_size`; at least one
    paper stays in train."""
    counts = collections.Counter(r["doi"] for r in rows)
    papers = sorted(counts)
    random.Random(seed).shuffle(papers)
    eval_papers: set[str] = set()
    total = 0
    for doi in papers:
        if total >= eval_size or len(eval_papers) >= len(papers) - 1:
            break
        if abs(total + counts[doi] - eval_size) < abs(total - eval_size):
            eval_papers.add(doi)
            total += counts[doi]
    train = [r for r in rows if r["doi"] not in eval_papers]
    evals = [r for r in rows if r["doi"] in eval_papers]
    return train, evals


def assemble(units: list[Unit], responses: dict[str, dict[str, Any]], failures: list[dict[str, Any]],
             p: GenerateParams, seed: int, *, n_papers: int, cached: set[str], this_run: dict[str, Any],
             estimated_cost_usd: float) -> Assembled:
    """Train/eval rows, every failure (those given, in order, plus papers whose every question duplicated another
    paper's), and the metrics. `cached` = the keys the cache held before the run; `this_run` = the run's own
    counters (`RunStats.summary`)."""
    rows = rows_from_responses(units, responses, p)
    kept, n_exact, n_near = dedup_questions(rows, p.near_duplicate_jaccard)
    failures = list(failures)
    with_pairs = {r["doi"] for r in kept}
    for doi in sorted({r["doi"] for r in rows} - with_pairs):
        failures.append(failure_row(doi, next(r["title"] for r in rows if r["doi"] == doi),
                                    "every question duplicated another paper's"))
    order = {pid: i for i, pid in enumerate(p.prompts)}
    failures.sort(key=lambda f: (f["doi"] or "", f["chunk"] or 0, order.get(f["prompt_id"], -1), f["reason"]))
    train, evals = split_by_paper(kept, p.eval_size, seed)

    used = [responses[u.key] for u in units if u.key in responses]
    pt = sum(v["prompt_tokens"] for v in used)
    ct = sum(v["completion_tokens"] for v in used)
    metrics = {
        "papers": n_papers, "papers_with_pairs": len(with_pairs),
        "papers_without_pairs": n_papers - len(with_pairs),
        "requests": len(units), "requests_answered": len(used), "requests_failed": len(units) - len(used),
        "pairs_raw": len(rows), "duplicates_exact": n_exact, "duplicates_near": n_near, "pairs": len(kept),
        "train_pairs": len(train), "eval_pairs": len(evals),
        "train_papers": len({r["doi"] for r in train}), "eval_papers": len({r["doi"] for r in evals}),
        "prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
        "cost_usd": round(cost_usd(pt, ct, p), 6),
        "estimated_cost_usd": estimated_cost_usd,
        "this_run": {**this_run, "requests_from_cache": sum(1 for u in units if u.key in cached)},
    }
    return Assembled(train=train, eval=evals, failures=failures, metrics=metrics)
