"""The pure core of the validate stage: `validate()` checks the pairs against their papers, splits them into clean
rows and quarantine, judges the dataset (the gate) and computes the metrics. It writes nothing but Data Docs (when
given a folder); the files are `stages.validate.run`'s business."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import ValidateParams
from .features import dataset_columns, row_features
from .suite import DATASET_SUITE, ROW_SUITE, CheckResult, GxRunner

SPLITS = ("train", "eval")


@dataclasses.dataclass
class Outcome:
    train: list[dict[str, Any]]                 # clean rows, input order
    eval: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]
    row_results: list[CheckResult]
    dataset_results: list[CheckResult]
    rows_in: dict[str, int]
    gate_passed: bool
    metrics: dict[str, Any]

    @property
    def reasons(self) -> dict[str, list[str]]:
        """row_id -> reasons, failing rows only."""
        return {q["row_id"]: q["reasons"] for q in self.quarantine}


def validate(train: Sequence[Any], eval_: Sequence[Any], papers: Iterable[dict[str, Any]], p: ValidateParams,
             docs_dir: Path | None = None) -> Outcome:
    """Check the pairs; split them into clean rows and quarantine; judge the dataset. Writes only `docs_dir`."""
    paper_map = {pp["doi"]: pp for pp in papers if isinstance(pp, dict) and isinstance(pp.get("doi"), str)}
    rows = [("train", i, r) for i, r in enumerate(train, 1)] + [("eval", i, r) for i, r in enumerate(eval_, 1)]
    feats = row_features(rows, paper_map, p)
    runner = GxRunner(p, docs_dir)
    row_cols = {k: [f[k] for f in feats] for k in (feats[0] if feats else _empty_row_columns(p))}
    row_results = runner.run(ROW_SUITE, row_cols)
    reasons: dict[str, list[str]] = {}
    for cr in row_results:
        for rid in cr.unexpected:
            reasons.setdefault(rid, []).append(cr.reason)
    failed = [f["row_id"] in reasons for f in feats]
    dataset_results = runner.run(DATASET_SUITE, dataset_columns(feats, failed))
    gate = all(c.success for c in dataset_results)

    clean: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    quarantine = []
    for (split, line, row), f, bad in zip(rows, feats, failed):
        if bad:
            scores = {"grounding": f["grounding"]}
            if "similarity" in f:
                scores["similarity"] = f["similarity"]
            quarantine.append({"row_id": f["row_id"], "split": split, "line": line,
                               "reasons": reasons[f["row_id"]], "scores": scores, "row": row})
        else:
            clean[split].append(row)
    rows_in = {s: sum(r[0] == s for r in rows) for s in SPLITS}
    metrics = _metrics(rows_in, clean, quarantine, row_results, dataset_results, gate, feats)
    return Outcome(clean["train"], clean["eval"], quarantine, row_results, dataset_results, rows_in, gate, metrics)


def _empty_row_columns(p: ValidateParams) -> dict[str, Any]:
    cols = dict.fromkeys(("row_id", "split", "question", "answer", "doi", "qa_text", "has_required_fields",
                          "types_ok", "is_question", "first_exact", "first_normalised", "is_english",
                          "provenance_ok", "paper_known", "title_matches", "grounding", "names_its_subject",
                          "answer_differs"))
    if p.min_similarity > 0:
        cols["similarity"] = None
    return cols


def _metrics(rows_in, clean, quarantine, row_results, dataset_results, gate, feats) -> dict[str, Any]:
    n_in = sum(rows_in.values())
    out = {
        "rows_in": {**rows_in, "total": n_in},
        "rows_out": {s: len(clean[s]) for s in SPLITS} | {"total": sum(len(v) for v in clean.values())},
        "rows_quarantined": len(quarantine),
        "fail_rate": round(len(quarantine) / n_in, 4) if n_in else None,
        "gate_passed": gate,
        "row_failures": {c.reason: len(c.unexpected) for c in row_results},
        "dataset_checks": {c.reason: {"success": c.success, "observed": c.observed} for c in dataset_results},
        "grounding_mean": round(sum(f["grounding"] for f in feats) / len(feats), 4) if feats else None,
    }
    if feats and "similarity" in feats[0]:
        out["similarity_mean"] = round(sum(f["similarity"] for f in feats) / len(feats), 4)
    return out
