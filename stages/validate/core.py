"""The pure core of the validate stage: `validate()` (pairs, seen questions and papers -> clean rows, quarantine,
gate, metrics; it writes only Data Docs, and asks the judge, a function, only about rows that passed the row checks:
every verdict is a paid request), the stderr summary and the Data Docs entry page."""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from . import DOCS_OUT, QUARANTINE_OUT, REPORT_OUT, ValidateParams
from .features import dataset_columns, fact_of, row_features, seen_columns
from .judge import Item, Verdict, make_item
from .suite import DATASET_SUITE, JUDGE_SUITE, ROW_SUITE, SEEN_SUITE, CheckResult, GxRunner

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
    reasons: dict[str, list[str]] = {}

    def check(suite: str, columns: dict[str, list[Any]]) -> list[CheckResult]:
        """Run one suite and note each failing row's reason."""
        results = runner.run(suite, columns)
        for cr in results:
            for rid in cr.unexpected:
                reasons.setdefault(rid, []).append(cr.reason)
        return results

    row_cols = ({k: [f[k] for f in feats] for k in feats[0]} if feats else  # no rows: the columns the checks read
                {k: [] for k in ("row_id", *(c.kwargs["column"] for c in runner.checks[ROW_SUITE]))})
    row_results = check(ROW_SUITE, row_cols)
    verdicts: dict[str, Verdict] = {}
    judge_results: list[CheckResult] = []
    if judge is not None and p.judge.endpoint is not None:
        verdicts = judge([make_item(f["row_id"], row, paper_map[f["doi"]]) for (_, _, row), f in zip(rows, feats)
                          if f["row_id"] not in reasons and f["doi"] in paper_map])
        # the scores are null (skipped by their checks) where the judge gave no verdict: `judge_failed` says so
        judge_results = check(JUDGE_SUITE, {"row_id": list(verdicts), "judge_ok": [v.ok for v in verdicts.values()],
                                            "judge_answerable": [v.answerable for v in verdicts.values()],
                                            "judge_correct": [v.correct for v in verdicts.values()]})
    # the seen rows are judged against the training rows that survived the row (and judge) checks
    seen_results = check(SEEN_SUITE, seen_columns(feats, [f["row_id"] in reasons for f in feats]))
    failed = [f["row_id"] in reasons for f in feats]
    pairs = [i for i, f in enumerate(feats) if f["split"] in SPLITS]
    dataset_results = runner.run(DATASET_SUITE, dataset_columns([feats[i] for i in pairs], [failed[i] for i in pairs]))
    gate = all(c.success for c in dataset_results)

    clean: dict[str, list[dict[str, Any]]] = {s: [] for s in (*SPLITS, SEEN)}
    quarantine = []
    for (split, line, row), f, bad in zip(rows, feats, failed):
        if bad:
            scores = {k: f[k] for k in ("grounding", "similarity") if k in f}
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
    metrics[SEEN] = {"rows_in": len(seen), "rows_out": len(clean[SEEN]),
                     "rows_quarantined": sum(q["split"] == SEEN for q in quarantine),
                     "row_failures": {c.reason: sum(u.startswith(f"{SEEN}:") for u in c.unexpected)
                                      for c in row_results + judge_results + seen_results}}
    if judge_results:
        metrics["judge"] = {"rows_judged": len(verdicts), "verdicts": sum(v.ok for v in verdicts.values())} | {
            c.reason: len(c.unexpected) for c in judge_results}
    return Outcome(clean["train"], clean["eval"], quarantine, row_results, dataset_results, rows_in, gate, metrics,
                   clean[SEEN], seen_results, judge_results, verdicts)


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


# ---------------------------------------------------------------------------------------------------------------
# What it tells a person


def _clip(text: Any, n: int = 100) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _observed(c: CheckResult) -> str:
    v = c.observed
    if "value_set" in c.limit:
        return f"{len(c.unexpected)} rows"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _limit(c: CheckResult) -> str:
    lo, hi = c.limit.get("min_value"), c.limit.get("max_value")
    if "value_set" in c.limit:
        return "0 rows"
    if hi is None:
        return f">= {lo:g}"
    return f"<= {hi:g}"


def summary(outcome: Outcome, examples: int = 3) -> str:
    """The short, readable report printed to stderr."""
    m = outcome.metrics
    n_in, n_out = m["rows_in"]["total"], m["rows_out"]["total"]
    head = "PASSED" if outcome.gate_passed else "FAILED (the clean dataset was not written; train will not run)"
    lines = [f"validate: gate {head}",
             f"  rows: {n_in} in (train {m['rows_in']['train']}, eval {m['rows_in']['eval']}), {n_out} clean "
             f"(train {m['rows_out']['train']}, eval {m['rows_out']['eval']}), {m['rows_quarantined']} quarantined"
             + (f" ({m['fail_rate']:.1%})" if m["fail_rate"] is not None else "")]
    if "seen" in m:
        lines.append(f"  seen questions (scored, never trained on): {m['seen']['rows_in']} in, "
                     f"{m['seen']['rows_out']} clean, {m['seen']['rows_quarantined']} quarantined")
    j = m.get("judge")
    if j:
        lines.append(f"  LLM judge {j.get('model', '')}: {j['rows_judged']} rows judged, {j.get('requests', 0)} requests "
                     f"this run ({j.get('cached', 0)} verdicts cached), ${j.get('cost_usd', 0.0):.4f}; "
                     f"{j.get('judge_unanswerable', 0)} unanswerable, {j.get('judge_incorrect', 0)} incorrect, "
                     f"{j.get('judge_failed', 0)} without a verdict")
    bad = [c for c in outcome.dataset_results if not c.success]
    if bad:
        lines.append("  dataset checks failed:")
        for c in bad:
            extra = f"; papers: {', '.join(sorted(set(c.unexpected_dois))[:5])}" if c.unexpected_dois else ""
            if c.reason == "max_paper_share" and outcome.train:
                facts = {(fact_of(r) or i): r.get("doi") for i, r in enumerate(outcome.train)}  # as the check counts
                top = Counter(facts.values()).most_common(3)
                extra = "; top papers: " + ", ".join(f"{d} ({n / len(facts):.0%})" for d, n in top)
            lines.append(f"    {c.reason}: observed {_observed(c)}, allowed {_limit(c)}{extra}")
    row_level = outcome.row_results + outcome.judge_results + outcome.seen_results
    counts = [(c.reason, len(c.unexpected)) for c in row_level if c.unexpected]
    if counts:
        lines.append("  failing rows per reason (all splits):")
        width = max(len(r) for r, _ in counts)
        lines += [f"    {r:<{width}}  {n}" for r, n in sorted(counts, key=lambda x: -x[1])]
        lines.append("  examples:")
        shown: set[str] = set()
        for c in sorted(row_level, key=lambda c: -len(c.unexpected)):  # a row not shown yet for each reason
            q = next((q for q in outcome.quarantine if c.reason in q["reasons"] and q["row_id"] not in shown), None)
            if q is None:
                continue
            shown.add(q["row_id"])
            row = q["row"] if isinstance(q["row"], dict) else {}
            lines.append(f"    {q['row_id']} [{', '.join(q['reasons'])}] Q: {_clip(row.get('question'), 80)!s}"
                         f" | A: {_clip(row.get('answer'), 60)!s}"
                         + (f" | judge: {_clip(q['judge']['reason'], 100)}" if "judge" in q else ""))
            if len(shown) >= examples * 2:
                break
    lines.append(f"  details: {DOCS_OUT}/index.html, {QUARANTINE_OUT}, {REPORT_OUT}")
    return "\n".join(lines)


def write_index_html(docs_dir: Path, outcome: Outcome, p: ValidateParams) -> None:
    """Our entry page: what failed at a glance, then links to GX's own pages (kept as gx_index.html)."""
    e = html.escape
    gx_index = docs_dir / "index.html"
    if gx_index.exists():
        os.replace(gx_index, docs_dir / "gx_index.html")
    pages = sorted(docs_dir.glob("validations/**/*.html"))
    m = outcome.metrics
    status = "PASSED" if outcome.gate_passed else "FAILED"
    color = "#1a7f37" if outcome.gate_passed else "#cf222e"
    questions = {q["row_id"]: str(q["row"].get("question")) if isinstance(q["row"], dict) else str(q["row"])
                 for q in outcome.quarantine}

    def table(results: list[CheckResult], row_level: bool) -> str:
        head = ("<tr><th>status</th><th>expectation</th><th>description</th><th>failing rows</th><th>examples</th></tr>"
                if row_level else
                "<tr><th>status</th><th>expectation</th><th>description</th><th>observed</th><th>allowed</th></tr>")
        body = []
        for c in sorted(results, key=lambda c: c.success):
            mark = f'<td class="{"ok" if c.success else "fail"}">{"passed" if c.success else "FAILED"}</td>'
            desc = e(_plain_description(c))
            if row_level:
                ex = "<br>".join(e(f"{rid}: {_clip(questions.get(rid, ''), 90)}") for rid in c.unexpected[:3])
                body.append(f"<tr>{mark}<td><code>{e(c.reason)}</code></td><td>{desc}</td>"
                            f"<td>{len(c.unexpected)}</td><td>{ex}</td></tr>")
            else:
                body.append(f"<tr>{mark}<td><code>{e(c.reason)}</code></td><td>{desc}</td>"
                            f"<td>{e(_observed(c))}</td><td>{e(_limit(c))}</td></tr>")
        return f"<table>{head}{''.join(body)}</table>"

    links = "".join(f'<li><a href="{e(pg.relative_to(docs_dir).as_posix())}">{e(pg.relative_to(docs_dir).as_posix())}'
                    f"</a></li>" for pg in pages)
    failed_row = [c for c in outcome.row_results + outcome.judge_results + outcome.seen_results if not c.success]
    failed_set = [c for c in outcome.dataset_results if not c.success]
    failed_list = "".join(f"<li><code>{e(c.reason)}</code> ({e(_observed(c)) if c in failed_set else len(c.unexpected)}"
                          f"{'' if c in failed_set else ' rows'}) — {e(_plain_description(c))}</li>"
                          for c in failed_set + failed_row) or "<li>none</li>"
    rate = (f" ({m['fail_rate']:.1%}; allowed {p.max_fail_rate:.0%})" if m["fail_rate"] is not None else "")
    seen = m.get("seen")
    seen_line = ("" if seen is None else
                 f"<p>Seen questions (&ldquo;seen papers, new questions&rdquo;: scored by evaluate, never trained on):"
                 f" {seen['rows_in']} in, {seen['rows_out']} clean, {seen['rows_quarantined']} quarantined; they "
                 "take the row-level checks and the seen checks, never the dataset-level ones.</p>")
    j = m.get("judge")
    judge_section = ("" if not outcome.judge_results else
                     f"<h2>LLM judge (suite <code>{JUDGE_SUITE}</code>)</h2>\n<p>{e(str(j.get('model', '')))} at "
                     f"{e(str(j.get('base_url', '')))}: {j['rows_judged']} rows that passed the row checks judged "
                     f"(threshold {p.judge.threshold} of 5); the judge's reason for each quarantined row is in "
                     f"<code>{e(str(QUARANTINE_OUT))}</code>.</p>\n{table(outcome.judge_results, True)}")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>validate: data quality report ({status})</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1f2328; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 1.5em; font-size: 14px; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f6f8fa; }} .ok {{ color: #1a7f37; }} .fail {{ color: #cf222e; font-weight: bold; }}
.banner {{ color: white; background: {color}; padding: 0.6em 1em; border-radius: 6px; }}
</style></head><body>
<h1>Quantum Research Bot: validation of the QA pairs</h1>
<p class="banner">Gate {status}: {len(failed_set)} dataset-level and {len(failed_row)} row-level expectations
failed.</p>
<p>Rows in: {m['rows_in']['total']} (train {m['rows_in']['train']}, eval {m['rows_in']['eval']}).
Clean rows out: {m['rows_out']['total']} (train {m['rows_out']['train']}, eval {m['rows_out']['eval']}).
Quarantined: {m['rows_quarantined']}{rate}
&mdash; every failing row with all its reasons is in <code>{e(str(QUARANTINE_OUT))}</code>.</p>
{seen_line}
<h2>Failed expectations</h2>
<ul>{failed_list}</ul>
<h2>Dataset-level expectations (suite <code>{DATASET_SUITE}</code>)</h2>
{table(outcome.dataset_results, False)}
<h2>Row-level expectations (suite <code>{ROW_SUITE}</code>)</h2>
{table(outcome.row_results, True)}
{judge_section}
<h2>Seen questions against the clean training pairs (suite <code>{SEEN_SUITE}</code>)</h2>
{table(outcome.seen_results, True)}
<h2>Great Expectations pages</h2>
<ul><li><a href="gx_index.html">Great Expectations Data Docs index</a></li>{links}</ul>
</body></html>
"""
    (docs_dir / "index.html").write_text(doc, encoding="utf-8")


def _plain_description(c: CheckResult) -> str:
    return re.sub(r"^\[[^\]]+\]\s*", "", c.description)
