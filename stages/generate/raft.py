"""RAFT rows (Zhang et al., 2024), pure and deterministic, no request: training facts asked as the apps ask with
retrieval, so that the model learns to answer from the excerpt of the paper a question names, cite it, and not cite
an excerpt of another paper.

A gold row: the fact's question in the user message `qrb.retrieval.rag_prompt` renders (the apps' own) over `top_k`
abstracts cut to `max_chars`, its paper's at a seeded position among distractors; the target is the fact's answer
citing that excerpt ([n]). A distractor row: distractors only; the target is the fact's answer, citing nothing.
Distractors are abstracts of OTHER TRAINING papers, those sharing the most words with the question first (what a
search would wrongly return); no eval (held-out) paper is ever shown. Facts of the abstract (chunk 0) with a short
answer only: a full-text fact's passage depends on the index's chunking.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from qrb.retrieval import Passage, passage_text, passages_from_papers, rag_prompt, with_citation, words

RAFT = "raft"  # the rows' prompt_id and kind
READ_WORDINGS = 2  # a read paper's fact asked over its excerpt in this many wordings: reading is the skill taught


def eligible(train: list[dict[str, Any]], held_out: set[str], abstracts: dict[str, Passage],
             wordings: int = 1) -> list[dict[str, Any]]:
    """The training facts RAFT rows may ask: the first `wordings` variants of an abstract fact with a short answer,
    on a training paper."""
    return [r for r in train if r.get("variant", 0) < wordings and r.get("kind", "fact") == "fact"
            and r.get("chunk") == 0 and (r.get("short_answer") or "").strip() and r["doi"] in abstracts
            and r["doi"] not in held_out]


def raft_rows(train: list[dict[str, Any]], held_out: Iterable[str], papers: list[dict[str, Any]], gold_share: float,
              distractor_share: float, top_k: int, max_chars: int, seed: int, shown_from: set[str] | None = None,
              wordings: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RAFT rows for `gold_share` and `distractor_share` (disjoint, seeded) of the eligible training facts (each of
    its first `wordings` wordings a row), and their counts. `held_out`: the eval split's DOIs, never shown; `papers`:
    the scraped papers (their abstracts); `shown_from`: the DOIs whose abstracts may be shown (default: the papers
    of `train`)."""
    held = set(held_out)
    on_train = (shown_from or {r["doi"] for r in train if r.get("doi")}) - held
    abstracts = {x.doi: x for x in passages_from_papers([pp for pp in papers if pp.get("doi") in on_train])}
    facts = sorted(eligible(train, held, abstracts, wordings), key=lambda r: (r["fact_id"], r.get("variant", 0)))
    rng = random.Random(f"raft:{seed}")
    rng.shuffle(facts)
    n_gold = round(gold_share * len(facts))
    n_dis = min(round(distractor_share * len(facts)), len(facts) - n_gold)
    pool = sorted(abstracts.values(), key=lambda x: x.doi)
    pool_words = [set(words(passage_text(x))) for x in pool]
    last: dict[str, int] = {}
    for r in train:
        last[r["fact_id"]] = max(last.get(r["fact_id"], 0), r["variant"])
    rows, chars = [], 0
    for n, f in enumerate(facts[:n_gold + n_dis]):
        gold = n < n_gold
        asked = set(words(f["question"]))
        tie = [rng.random() for _ in pool]
        order = sorted((j for j, x in enumerate(pool) if x.doi != f["doi"]),
                       key=lambda j: (-len(asked & pool_words[j]), tie[j]))
        shown = [pool[j] for j in order[:top_k - gold]]
        if not shown and not gold:
            continue
        at = rng.randrange(len(shown) + 1) if gold else -1
        if gold:
            shown.insert(at, abstracts[f["doi"]])
        # RAFT's own choice for the distractor-only share: the same answer from memory (so that retrieval missing the
        # paper costs no known fact), never citing an excerpt that does not state it
        answer = with_citation(f["answer"], at + 1) if gold else f["answer"]
        prompt = rag_prompt(f["question"], [(x, 0.0) for x in shown], max_chars)
        rows.append({**f, "question": prompt, "answer": answer, "prompt_id": RAFT, "kind": RAFT,
                     "variant": last[f["fact_id"]] + 1 + f.get("variant", 0)})
        chars += len(prompt) + len(answer)
    return rows, {"raft_eligible_facts": len(facts), "raft_gold_rows": n_gold,
                  "raft_distractor_rows": len(rows) - n_gold, "raft_chars": chars}


def reading_rows(train: list[dict[str, Any]], seen: list[dict[str, Any]], held_out: Iterable[str],
                 papers: list[dict[str, Any]], share: float, top_k: int, max_chars: int, seed: int
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """`share` of the training papers (seeded) become papers the model only READS, the held-out paper's case: asked
    closed-book (every wording it had), it declines; asked with the paper's excerpt among distractors
    (`READ_WORDINGS` wordings a fact), it answers citing it; over distractors only, it declines. They leave the seen
    set. Returns (train, seen, counts)."""
    from qrb.schema import ABSTAIN_ANSWER

    held = set(held_out)
    papers_on = sorted({r["doi"] for r in train if r.get("kind") == "fact" and r.get("doi")} - held)
    chosen = set(random.Random(f"reading:{seed}").sample(papers_on, round(share * len(papers_on))))
    read = [r for r in train if r.get("doi") in chosen and r.get("kind") in ("fact", "reverse")]
    pool = set(papers_on)
    gold, _ = raft_rows(read, held, papers, 1.0, 0.0, top_k, max_chars, seed, pool, wordings=READ_WORDINGS)
    blind, _ = raft_rows(read, held, papers, 0.0, 1.0, top_k, max_chars, seed, pool)
    declined = dict(answer=ABSTAIN_ANSWER, short_answer="", aliases=[], evidence="")
    # R-Tuning's "unsure" target on real questions about a real paper: invented papers alone do not teach it
    unknown = [{**r, **declined, "kind": "abstain"} for r in read]
    for r in blind:  # nothing shown states it and it was never learnt: decline
        r.update(declined, variant=r["variant"] + READ_WORDINGS)
    kept = [r for r in train if r.get("doi") not in chosen]
    return kept + unknown + gold + blind, [r for r in seen if r.get("doi") not in chosen], {
        "reading_papers": len(chosen), "reading_rows": len(unknown) + len(gold) + len(blind)}
