"""The pure core of the validate stage: `validate()` checks the pairs (and the seen questions) against their papers,
splits them into clean rows and quarantine, judges the dataset (the gate) and computes the metrics. It writes
nothing but Data Docs (when given a folder); the files are `stages.validate.run`'s business, and so are the LLM
judge's requests: `validate()` takes the judge as a function (row items -> verdicts) and asks it only about the rows
that passed the row checks (the cheap checks first: every verdict is a paid request)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import ValidateParams
from .features import dataset_columns, row_features, seen_columns
from .suite import DATASET_SUITE, JUDGE_SUITE, ROW_SUITE, SEEN_SUITE, CheckResult, GxRunner
from .verdicts import Item, Verdict, make_item

JudgeFn = Callable[[list[Item]], "dict[str, Verdict]"]

SPLITS = ("train", "eval")   # the training dataset's splits: the gate judges these
SEEN = "seen"                # "seen papers, new questions": checked, passed on to evaluate, never trained on


@dataclasses.dataclass
class Outcome:
    train: list[dict[str, Any]]                 # clean rows, input order
    eval: list[dict[str, Any]]
    quarantine: list[dict[str, Any]]            # every split's failing rows (split "train", "eval" or "seen")
    row_results: list[CheckResult]
    dataset_results: list[CheckResult]
    rows_in: dict[str, int]
    gate_passed: bool
    metrics: dict[str, Any]
    seen: list[dict[str, Any]] = dataclasses.field(default_factory=list)          # clean seen rows, input order
    seen_results: list[CheckResult] = dataclasses.field(default_factory=list)
    judge_results: list[CheckResult] = dataclasses.field(default_factory=list)   # empty without a judge
    verdicts: dict[str, Verdict] = dataclasses.field(default_factory=dict)       # row_id -> the judge's verdict

    @property
    def reasons(self) -> dict[str, list[str]]:
        """row_id -> reasons, failing rows only."""
        return {q["row_id"]: q["reasons"] for q in self.quarantine}


def validate(train: Sequence[Any], eval_: Sequence[Any], papers: Iterable[dict[str, Any]], p: ValidateParams,
             docs_dir: Path | None = None, seen: Sequence[Any] = (), judge: JudgeFn | None = None) -> Outcome:
    """Check the pairs; split them into clean rows and quarantine; judge the dataset. Writes only `docs_dir`.
    With `judge` (and `p.judge.endpoint` set), the rows of every split that pass the row checks get its verdict."""
    paper_map = {pp["doi"]: pp for pp in papers if isinstance(pp, dict) and isinstance(pp.get("doi"), str)}
    rows = [(s, i, r) for s, part in (("train", train), ("eval", eval_), (SEEN, seen)) for i, r in enumerate(part, 1)]
    feats = row_features(rows, paper_map, p)
    runner = GxRunner(p, docs_dir)
    row_cols = {k: [f[k] for f in feats] for k in (feats[0] if feats else _empty_row_columns(p))}
    row_results = runner.run(ROW_SUITE, row_cols)
    reasons: dict[str, list[str]] = {}
    for cr in row_results:
        for rid in cr.unexpected:
            reasons.setdefault(rid, []).append(cr.reason)
    verdicts: dict[str, Verdict] = {}
    judge_results: list[CheckResult] = []
    if judge is not None and p.judge.endpoint is not None:
        verdicts = judge([make_item(f["row_id"], row, paper_map[f["doi"]]) for (_, _, row), f in zip(rows, feats)
                          if f["row_id"] not in reasons and f["doi"] in paper_map])
        judge_results = runner.run(JUDGE_SUITE, judge_columns(verdicts))
        for cr in judge_results:
            for rid in cr.unexpected:
                reasons.setdefault(rid, []).append(cr.reason)
    # the seen rows are judged against the training rows that survived the row (and judge) checks
    seen_results = runner.run(SEEN_SUITE, seen_columns(feats, [f["row_id"] in reasons for f in feats]))
    for cr in seen_results:
        for rid in cr.unexpected:
            reasons.setdefault(rid, []).append(cr.reason)
    failed = [f["row_id"] in reasons for f in feats]
    pairs = [i for i, f in enumerate(feats) if f["split"] in SPLITS]
    dataset_results = runner.run(DATASET_SUITE, dataset_columns([feats[i] for i in pairs], [failed[i] for i in pairs]))
    gate = all(c.success for c in dataset_results)

    clean: dict[str, list[dict[str, Any]]] = {s: [] for s in (*SPLITS, SEEN)}
    quarantine = []
    for (split, line, row), f, bad in zip(rows, feats, failed):
        if bad:
            scores = {"grounding": f["grounding"]}
            if "similarity" in f:
                scores["similarity"] = f["similarity"]
            q = {"row_id": f["row_id"], "split": split, "line": line, "reasons": reasons[f["row_id"]],
                 "scores": scores, "row": row}
            v = verdicts.get(f["row_id"])
            if v is not None:  # the judge's own words, next to its scores
                scores.update(judge_answerable=v.answerable, judge_correct=v.correct)
                q["judge"] = {"answerable": v.answerable, "correct": v.correct, "reason": v.reason}
            quarantine.append(q)
        else:
            clean[split].append(row)
    rows_in = {s: sum(r[0] == s for r in rows) for s in SPLITS}
    metrics = _metrics(rows_in, clean, quarantine, row_results + judge_results, dataset_results, gate, feats)
    metrics[SEEN] = _seen_metrics(len(seen), clean[SEEN], quarantine, row_results + judge_results + seen_results)
    if judge_results:
        metrics["judge"] = {"rows_judged": len(verdicts), "verdicts": sum(v.ok for v in verdicts.values())} | {
            c.reason: len(c.unexpected) for c in judge_results}
    return Outcome(clean["train"], clean["eval"], quarantine, row_results, dataset_results, rows_in, gate, metrics,
                   clean[SEEN], seen_results, judge_results, verdicts)


def judge_columns(verdicts: dict[str, Verdict]) -> dict[str, list[Any]]:
    """The judge suite's columns, one per judged row; the scores are null (skipped by their checks) where the judge
    gave no verdict: `judge_failed` says so instead."""
    return {"row_id": list(verdicts), "judge_ok": [v.ok for v in verdicts.values()],
            "judge_answerable": [v.answerable for v in verdicts.values()],
            "judge_correct": [v.correct for v in verdicts.values()]}


def _empty_row_columns(p: ValidateParams) -> dict[str, Any]:
    cols = dict.fromkeys(("row_id", "split", "question", "answer", "doi", "fact_id", "qa_text",
                          "has_required_fields", "types_ok", "is_question", "first_exact", "first_normalised",
                          "is_english", "provenance_ok", "paper_known", "doi_ok", "title_matches", "grounding",
                          "names_its_subject", "answer_differs"))
    if p.min_similarity > 0:
        cols["similarity"] = None
    return cols


def _metrics(rows_in, clean, quarantine, row_results, dataset_results, gate, feats) -> dict[str, Any]:
    """The training dataset's numbers (train + eval: what the gate judged); the seen split has its own block."""
    n_in = sum(rows_in.values())
    pair_feats = [f for f in feats if f["split"] in SPLITS]
    pair_quarantine = [q for q in quarantine if q["split"] in SPLITS]
    out = {
        "rows_in": {**rows_in, "total": n_in},
        "rows_out": {s: len(clean[s]) for s in SPLITS} | {"total": sum(len(clean[s]) for s in SPLITS)},
        "rows_quarantined": len(pair_quarantine),
        "fail_rate": round(len(pair_quarantine) / n_in, 4) if n_in else None,
        "gate_passed": gate,
        "row_failures": {c.reason: sum(not u.startswith(f"{SEEN}:") for u in c.unexpected) for c in row_results},
        "dataset_checks": {c.reason: {"success": c.success, "observed": c.observed} for c in dataset_results},
        "grounding_mean": (round(sum(f["grounding"] for f in pair_feats) / len(pair_feats), 4)
                           if pair_feats else None),
    }
    if pair_feats and "similarity" in pair_feats[0]:
        out["similarity_mean"] = round(sum(f["similarity"] for f in pair_feats) / len(pair_feats), 4)
    return out


def _seen_metrics(n_in: int, clean: list[dict[str, Any]], quarantine: list[dict[str, Any]],
                  results: list[CheckResult]) -> dict[str, Any]:
    return {
        "rows_in": n_in,
        "rows_out": len(clean),
        "rows_quarantined": sum(q["split"] == SEEN for q in quarantine),
        "row_failures": {c.reason: sum(u.startswith(f"{SEEN}:") for u in c.unexpected) for c in results},
    }
