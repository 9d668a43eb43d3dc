"""Pure post-processing: the answered units -> facts (deduplicated across facts, split by paper), their variants,
the seen questions, the failure rows and the metrics. No I/O: `run` writes what `assemble` returns, and calls
`collect_facts` / `with_variants` between its rounds of requests to know which fact-level requests to make."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import zlib
from typing import Any

from qrb.schema import QAPair
from qrb.words import norm_words

from . import AUGMENT, INVENT, PARAPHRASE, GenerateParams
from .facts import fact_id, invented_rows, seen_rows, variants_of
from .replies import parse_pairs
from .units import Unit, failure_row, reply_cost

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Assembled:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    seen: list[dict[str, Any]]
    invented: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    metrics: dict[str, Any]
    practice: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # facts to learn by reading (raft.py)


@dataclasses.dataclass
class Facts:
    """The QA round's outcome: one row per kept pair (a fact, variant 0), split by paper."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    raw: int                        # pairs in the replies
    exact: int                      # ... dropped as exact duplicates of another fact's question
    near: int                       # ... and as near-duplicates
    failures: list[dict[str, Any]]  # papers whose every question duplicated another paper's
    eval_capped: bool               # the eval split stopped at `eval_max_paper_share` short of `eval_size`
    eval_max_papers: int
    practice: list[dict[str, Any]]  # the replies' further pairs (the reading practice's), not deduplicated yet


def rows_from_responses(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams
                        ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pairs of every answered QA unit, as QAPair records (variant 0 of a fact each), in (paper, chunk,
    prompt) order: (the first `pairs_per_prompt` of each reply: the facts, those after them: the reading
    practice's, `raft_read_facts`)."""
    order = {pid: i for i, pid in enumerate(p.prompts)}
    facts: list[dict[str, Any]] = []
    practice: list[dict[str, Any]] = []
    for unit in sorted(units, key=lambda u: (u.doi, u.chunk, order[u.prompt_id])):
        value = responses.get(unit.key)
        if value is None:
            continue
        for i, pair in enumerate(parse_pairs(value["content"])[:p.facts_asked]):
            (facts if i < p.pairs_per_prompt else practice).append(QAPair(
                question=pair["question"], answer=pair["answer"], doi=unit.doi, title=unit.title,
                published=unit.published, prompt_id=unit.prompt_id, model=value["model"],
                response_id=value["response_id"], chunk=unit.chunk, fact_id=fact_id(unit.doi, pair["question"]),
                variant=0, short_answer=pair.get("short_answer", ""), aliases=tuple(pair.get("aliases", ())),
                evidence=pair.get("evidence", "")).record())
    return facts, practice


def dedup_questions(rows: list[dict[str, Any]], threshold: float) -> tuple[list[dict[str, Any]], int, int]:
    """Drop exact (after normalisation) and near-duplicate questions (word-set Jaccard >= threshold) of another
    fact's question, keeping the first; rows of the same `fact_id` (its variants) are never compared with each
    other. Near-duplicate candidates come from MinHash banding, then are verified exactly."""
    kept: list[dict[str, Any]] = []
    kept_sets: list[frozenset[str]] = []
    kept_groups: list[str] = []
    exact: dict[str, set[str]] = collections.defaultdict(set)
    buckets: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)
    n_exact = n_near = 0
    n_hash, rows_per_band = 24, 2
    for i, row in enumerate(rows):
        group = row.get("fact_id") or f"#{i}"
        words = norm_words(row["question"])
        norm = " ".join(words)
        if exact[norm] - {group}:
            n_exact += 1
            continue
        wset = frozenset(words) or frozenset([norm])
        sig = [min(zlib.crc32(f"{h}:{w}".encode()) for w in wset) for h in range(n_hash)]
        bands = [(b, sig[b * rows_per_band], sig[b * rows_per_band + 1]) for b in range(n_hash // rows_per_band)]
        candidates = {j for band in bands for j in buckets.get(band, ()) if kept_groups[j] != group}
        if any(len(wset & kept_sets[j]) / len(wset | kept_sets[j]) >= threshold for j in candidates):
            n_near += 1
            continue
        exact[norm].add(group)
        idx = len(kept)
        kept.append(row)
        kept_sets.append(wset)
        kept_groups.append(group)
        for band in bands:
            buckets[band].append(idx)
    return kept, n_exact, n_near


def split_by_paper(rows: list[dict[str, Any]], eval_size: int, seed: int, max_paper_share: float = 1.0
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Whole papers go to eval (in a seeded order) while that brings its size closer to `eval_size`, from at most
    `max_paper_share` of the papers; at least one paper stays in train. Returns (train, eval, capped): capped = the
    share stopped the eval split where another paper would have brought it closer to `eval_size`."""
    counts = collections.Counter(r["doi"] for r in rows)
    papers = sorted(counts)
    random.Random(seed).shuffle(papers)
    cap = math.floor(max_paper_share * len(papers) + 1e-9)
    eval_papers: set[str] = set()
    total, capped = 0, False
    for doi in papers:
        if total >= eval_size or len(eval_papers) >= len(papers) - 1:
            break
        if abs(total + counts[doi] - eval_size) < abs(total - eval_size):
            if len(eval_papers) >= cap:
                capped = True
                break
            eval_papers.add(doi)
            total += counts[doi]
    train = [r for r in rows if r["doi"] not in eval_papers]
    evals = [r for r in rows if r["doi"] in eval_papers]
    return train, evals, capped


def collect_facts(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams, seed: int) -> Facts:
    """The QA round's replies -> the facts, deduplicated across facts and split by paper."""
    rows, practice = rows_from_responses(units, responses, p)
    kept, n_exact, n_near = dedup_questions(rows, p.near_duplicate_jaccard)
    failures = []
    with_pairs = {r["doi"] for r in kept}
    for doi in sorted({r["doi"] for r in rows} - with_pairs):
        failures.append(failure_row(doi, next(r["title"] for r in rows if r["doi"] == doi),
                                    "every question duplicated another paper's"))
    train, evals, capped = split_by_paper(kept, p.eval_size, seed, p.eval_max_paper_share)
    return Facts(train=train, eval=evals, raw=len(rows), exact=n_exact, near=n_near, failures=failures,
                 eval_capped=capped, eval_max_papers=math.floor(p.eval_max_paper_share * len(with_pairs) + 1e-9),
                 practice=practice)


def with_variants(facts: Facts, units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams
                  ) -> tuple[list[dict[str, Any]], collections.Counter]:
    """The training rows: every training fact followed by its variants (from the answered augment units), a
    variant that duplicates another fact's question removed (dedup across facts only)."""
    counts: collections.Counter = collections.Counter()
    by_fact = {f["fact_id"]: f for f in facts.train}
    variants: list[dict[str, Any]] = []
    for unit in units:
        value = responses.get(unit.key)
        if value is not None and unit.fact_id in by_fact:
            rows, c = variants_of(by_fact[unit.fact_id], value, p)
            variants += rows
            counts.update(c)
    all_facts = facts.train + facts.eval
    kept, n_exact, n_near = dedup_questions(all_facts + variants, p.near_duplicate_jaccard)
    counts["variants_duplicates"] += n_exact + n_near
    grouped: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in kept[len(all_facts):]:  # numbered 1..n again where a duplicate left a gap
        grouped[r["fact_id"]].append({**r, "variant": len(grouped[r["fact_id"]]) + 1})
    counts["variants"] = sum(len(v) for v in grouped.values())
    return [r for f in facts.train for r in [f] + grouped[f["fact_id"]]], counts


def _usage(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams) -> dict[str, Any]:
    used = [responses[u.key] for u in units if u.key in responses]
    pt = sum(v["prompt_tokens"] for v in used)
    ct = sum(v["completion_tokens"] for v in used)
    return {"requests": len(units), "answered": len(used), "failed": len(units) - len(used), "prompt_tokens": pt,
            "completion_tokens": ct, "cost_usd": round(sum(reply_cost(v, p) for v in used), 6),
            "answered_by_batch": sum(bool(v.get("batch")) for v in used)}


def assemble(units: list[Unit], responses: dict[str, dict[str, Any]], failures: list[dict[str, Any]],
             p: GenerateParams, seed: int, *, n_papers: int, cached: set[str], this_run: dict[str, Any],
             estimated_cost_usd: float, augment: list[Unit] = (), paraphrase: list[Unit] = (),
             invent: list[Unit] = ()) -> Assembled:
    """Train/eval/seen rows, every failure (those given, in order, plus papers whose every question duplicated
    another paper's), and the metrics. `units` = the QA units, `augment` / `paraphrase` the fact-level ones;
    `cached` = the keys the cache held before the run; `this_run` = the run's own counters."""
    facts = collect_facts(units, responses, p, seed)
    train, vcounts = with_variants(facts, list(augment), responses, p)
    by_fact = {f["fact_id"]: f for f in facts.train}
    seen, seen_dropped = seen_rows(list(paraphrase), responses, by_fact, train, p.seen_max_jaccard)
    real_titles = sorted({u.title for u in units})
    abstain, invented, invented_dropped = invented_rows(list(invent), responses, real_titles,
                                                        round(p.abstain_share * len(train)),
                                                        p.near_duplicate_jaccard, [r["question"] for r in train],
                                                        p.seen_max_jaccard)
    train = train + abstain
    # reading practice: the further facts of training papers, each new to every question asked so far
    on_train = {r["doi"] for r in facts.train}
    extra = [r for r in facts.practice if r["doi"] in on_train]
    new = {id(r) for r in extra}
    practice = [r for r in dedup_questions(train + facts.eval + seen + extra, p.near_duplicate_jaccard)[0]
                if id(r) in new]
    failures = list(failures) + facts.failures
    order = {pid: i for i, pid in enumerate(p.prompts + (AUGMENT, PARAPHRASE, INVENT))}
    failures.sort(key=lambda f: (f["doi"] or "", f["chunk"] or 0, order.get(f["prompt_id"], -1),
                                 f.get("fact_id") or "", f["reason"]))
    if facts.eval_capped:
        log.warning("generate: the eval split holds %d facts from %d papers, short of generate.eval_size %d: "
                    "capped at generate.eval_max_paper_share %.2f of the %d papers with facts", len(facts.eval),
                    len({r["doi"] for r in facts.eval}), p.eval_size, p.eval_max_paper_share,
                    len({r["doi"] for r in facts.train + facts.eval}))

    kinds = {"qa": units, AUGMENT: list(augment), PARAPHRASE: list(paraphrase), INVENT: list(invent)}
    by_kind = {k: _usage(u, responses, p) for k, u in kinds.items()}
    total = _usage([u for us in kinds.values() for u in us], responses, p)
    with_pairs = {r["doi"] for r in facts.train + facts.eval}
    metrics = {
        "papers": n_papers, "papers_with_pairs": len(with_pairs), "papers_without_pairs": n_papers - len(with_pairs),
        "requests": total["requests"], "requests_answered": total["answered"], "requests_failed": total["failed"],
        "requests_by_kind": by_kind,
        "pairs_raw": facts.raw, "duplicates_exact": facts.exact, "duplicates_near": facts.near,
        "facts": len(facts.train) + len(facts.eval), "train_facts": len(facts.train), "eval_facts": len(facts.eval),
        "augment_variants": p.augment_variants, "variants": vcounts["variants"],
        "variants_repeated": vcounts["variants_repeated"], "variants_lost_facts": vcounts["variants_lost_facts"],
        "variants_duplicates": vcounts["variants_duplicates"],
        "pairs": len(train) + len(facts.eval), "train_pairs": len(train), "eval_pairs": len(facts.eval),
        "train_papers": len({r["doi"] for r in train}), "eval_papers": len({r["doi"] for r in facts.eval}),
        "eval_max_papers": facts.eval_max_papers, "eval_capped": facts.eval_capped,
        "seen_requested": len(paraphrase), "seen_kept": len(seen), "seen_dropped_near_duplicate": seen_dropped,
        "seen_failed": by_kind[PARAPHRASE]["failed"], "variants_reverse": vcounts["variants_reverse"],
        "abstain_pairs": len(abstain), "invented_kept": len(invented), "invented_dropped": invented_dropped,
        "prompt_tokens": total["prompt_tokens"], "completion_tokens": total["completion_tokens"],
        "total_tokens": total["prompt_tokens"] + total["completion_tokens"], "cost_usd": total["cost_usd"],
        "estimated_cost_usd": estimated_cost_usd,
        "this_run": {**this_run, "requests_from_cache": sum(1 for us in kinds.values() for u in us if u.key in cached)},
    }
    return Assembled(train=train, eval=facts.eval, seen=seen, invented=invented, failures=failures, metrics=metrics,
                     practice=practice)
