"""The stage's outputs: the headline metrics and the full report, predictions, the card-shaped markdown table, the
DVC plots' CSVs (one chart per question set)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from qrb.io import atomic_write_text, rounded, write_jsonl, write_metrics

from . import EvaluateParams

METRICS = Path("metrics/evaluate.json")  # per question set x model, HEADLINE_METRICS only: what dvc compares
REPORT = Path("reports/evaluate.json")  # everything: the freshness subsets, intervals, n, the other scores
PREDICTIONS = Path("artifacts/evaluate/predictions.jsonl")
TABLE = Path("reports/eval_table.md")
SCORES_DIR = Path("plots/evaluate/scores")  # <set>.csv per question set: one chart each in `dvc plots show`

SET_DESCRIPTIONS = {"golden": "the card's questions", "seen": "seen papers, new questions",
                    "eval": "held-out papers", "invented": "papers that do not exist"}
SET_TITLES = {"after_cutoff": "on papers first public after the knowledge cutoff ({c})",
              "before_cutoff": "on papers first public on or before the knowledge cutoff ({c})"}
HEADLINE_METRICS = ("correct", "not_attempted", "hallucination_rate", "cross_entropy")
RAG_HEADLINE = ("recall_at_k", "citation_accuracy")  # only the RAG rows have them
# the chart's bars: the grades' rates (0-1)
PLOT_METRICS = ("correct", "incorrect", "not_attempted", "hallucination_rate")
# (column title, metric key, format): the grades first, so that a style gain (shorter answers in the abstracts'
# words: higher ROUGE) cannot pass for knowledge
COLUMNS = (("correct", "correct", ".3f"), ("Δ correct vs base", "correct_gain", "+.3f"),
           ("not attempted", "not_attempted", ".3f"), ("incorrect", "incorrect", ".3f"),
           ("hallucination rate", "hallucination_rate", ".3f"), ("recall@k", "recall_at_k", ".3f"),
           ("citation accuracy", "citation_accuracy", ".3f"), ("words", "answer_words", ".1f"),
           ("eval CE", "cross_entropy", ".3f"), ("BERTScore F1", "bertscore_f1", ".3f"), ("ROUGE-1", "rouge1", ".3f"),
           ("ROUGE-2", "rouge2", ".3f"), ("ROUGE-L", "rougeL", ".3f"), ("BLEU (corpus)", "bleu", ".2f"),
           ("BLEU (mean sentence)", "sentence_bleu", ".2f"))


def model_labels(base_model: str, p: EvaluateParams, rp=None) -> dict[str, str]:
    """Each row's label; `rp`: the `retrieval:` params the RAG rows ran with."""
    how = f"{rp.method} top-{rp.top_k}, min score {rp.min_score:g}" if rp else "retrieval"
    labels = {"base": f"base ({base_model})", "fine_tuned": f"fine-tuned ({base_model} + adapter)",
              "rag": f"RAG: base + the apps' retrieval ({how})",
              "fine_tuned_rag": "fine-tuned + RAG: adapter + the same passages"}
    for r in p.rivals:
        labels[r.key] = f"{r.name} ({r.model}, endpoint)"
    if p.grader is not None:
        labels["grader"] = f"LLM grader ({p.grader.model} at {p.grader.base_url})"
    return labels


def _cell(m: dict[str, Any], key: str, fmt: str) -> str:
    if m.get(key) is None:
        return "–"
    ci = m.get(f"{key}_ci95")
    if isinstance(ci, str):  # "n too small"
        return f"{m[key]:{fmt}} ({ci})"
    return f"{m[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def _title(set_name: str, cutoff: dt.date) -> str:
    name, split = set_name, ""
    for suffix, text in SET_TITLES.items():
        if set_name.endswith("_" + suffix):
            name, split = set_name.removesuffix("_" + suffix), " " + text.format(c=cutoff.isoformat())
    desc = f" ({SET_DESCRIPTIONS[name]})" if name in SET_DESCRIPTIONS else ""
    return f"{name} questions{desc}{split}"


def markdown_table(metrics: dict[str, Any], labels: dict[str, str], cutoff: dt.date,
                   skipped: dict[str, str] | None = None, graded_by: str | None = None) -> str:
    lines = ["# Evaluation", ""]
    for set_name, by_model in metrics.items():
        if not by_model:
            continue
        first = next(iter(by_model.values()))
        lines += [f"### {_title(set_name, cutoff)} (n={first['n']})", ""]
        if not first["n"]:
            lines += ["No questions in this set.", ""]
            continue
        if first.get("graded_n", first["n"]) < first["n"]:
            lines += [f"Graded over the {first['graded_n']} of {first['n']} questions that have a short gold answer "
                      "(the others count only towards not attempted).", ""]
        lines += ["| model | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        for model_name, m in by_model.items():
            lines.append(f"| {labels.get(model_name, model_name)} | "
                         + " | ".join(_cell(m, key, fmt) for _, key, fmt in COLUMNS) + " |")
        lines.append("")
    for key, reason in (skipped or {}).items():
        after = " (the offline grades instead)" if key == "grader" else ""
        lines.append(f"- **{labels.get(key, key)}: skipped** ({reason}){after}")
    if skipped:
        lines.append("")
    lines.append(
        "Each metric with its 95% bootstrap interval [lo, hi] over resampled questions (the same resamples for "
        "every model), or \"n too small\" below the minimum number of questions. Each answer is graded against the "
        f"question's short gold answer by {graded_by or 'the offline grader (qrb/grade.py)'}: correct "
        "(the gold stated, no rival candidate beside it), incorrect (anything else it commits to) or not attempted "
        "(it declines); hallucination rate = incorrect / (correct + incorrect); Δ correct vs base: the paired "
        "difference against the base model on the same questions. On held-out and invented papers the right answer "
        "is not to attempt. Words is the mean answer length: a ROUGE gain with shorter answers and no gain in correct "
        "answers is style, not knowledge. ROUGE is the F measure (stemmed); BLEU (corpus) is sacrebleu's corpus "
        "score, BLEU (mean sentence) the mean of its sentence scores (the card's \"mean/avg\"), both 0-100; "
        "BERTScore is F1; eval CE is the token-weighted cross-entropy of the reference answers (local models without "
        "retrieval). The RAG rows answer as `qrb ask --rag` does (the same passages, message and abstention) and cite "
        "the excerpts their answer names ([n]): recall@k is the share of questions whose paper (DOI) is among the "
        "passages shown, citation accuracy the share of attempted answers whose first cited paper is the "
        "question's (citing nothing is wrong); neither is defined without a DOI.")
    return "\n".join(lines) + "\n"


def whole_sets(metrics: dict[str, Any]) -> list[str]:
    """The question sets themselves, not their freshness subsets (those are in the report only)."""
    return [s for s in metrics if not s.endswith(tuple("_" + suffix for suffix in SET_TITLES))]


def headline_keys(metrics: dict[str, Any]) -> list[str]:
    return [f"{s}.*.{key}" for s in whole_sets(metrics) for key in HEADLINE_METRICS + RAG_HEADLINE]


def write_scores(metrics: dict[str, Any], out_dir: Path = SCORES_DIR) -> None:
    """The DVC plots' data, <set>.csv: per question set with questions, one bar per model and headline score
    (lo and hi empty where there is no interval)."""
    csvs = {}
    for set_name in whole_sets(metrics):
        lines = ["label,model,metric,score,lo,hi"]
        for model_name, m in metrics[set_name].items():
            for key in PLOT_METRICS:
                if m.get(key) is None:
                    continue
                ci = m.get(f"{key}_ci95")
                lo, hi = (f"{ci[0]:.6f}", f"{ci[1]:.6f}") if isinstance(ci, list) else ("", "")
                lines.append(f"{model_name} {key},{model_name},{key},{m[key]:.6f},{lo},{hi}")
        if len(lines) > 1:
            csvs[set_name] = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.csv"):
        if stale.stem not in csvs:
            stale.unlink()
    for set_name, text in csvs.items():
        atomic_write_text(out_dir / f"{set_name}.csv", text)


def write_outputs(metrics: dict[str, Any], predictions: list[dict[str, Any]], labels: dict[str, str],
                  p: EvaluateParams, skipped: dict[str, str]) -> str:
    """Writes the declared outputs (values rounded as every stage rounds them); returns the table."""
    write_metrics(METRICS, REPORT, metrics, headline_keys(metrics))
    write_jsonl(PREDICTIONS, rounded(predictions))
    graded_by = labels["grader"] if p.grader is not None and "grader" not in skipped else None
    atomic_write_text(TABLE, markdown_table(metrics, labels, p.knowledge_cutoff, skipped, graded_by))
    write_scores(metrics)
    return TABLE.read_text()
