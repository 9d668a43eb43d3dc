"""The stage's outputs: the metrics and predictions files, the card-shaped markdown table, the DVC plot's CSV."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from qrb.io import atomic_write_text, rounded, write_json, write_jsonl

from . import EvaluateParams

METRICS = Path("metrics/evaluate.json")
PREDICTIONS = Path("artifacts/evaluate/predictions.jsonl")
TABLE = Path("reports/eval_table.md")
SCORES_PLOT = Path("plots/evaluate/scores.csv")

SET_TITLES = {"after_cutoff": "on papers published after the knowledge cutoff ({c})",
              "before_cutoff": "on papers published on or before the knowledge cutoff ({c})"}
PLOT_METRICS = ("bertscore_f1", "rouge1", "rouge2", "rougeL", "bleu")


def model_labels(base_model: str, p: EvaluateParams) -> dict[str, str]:
    labels = {"fine_tuned": f"fine-tuned ({base_model} + adapter)", "base": f"base ({base_model})",
              "rag": f"RAG: base + top-{p.rag_top_k} abstracts (MiniLM retrieval)"}
    for r in p.rivals:
        labels[r.key] = f"{r.name} ({r.model}, endpoint)"
    return labels


def _cell(m: dict[str, Any], key: str, fmt: str) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def markdown_table(metrics: dict[str, Any], labels: dict[str, str], cutoff: dt.date,
                   skipped: dict[str, str] | None = None) -> str:
    lines = ["# Evaluation", ""]
    for set_name, by_model in metrics.items():
        if not by_model:
            continue
        n = next(iter(by_model.values()))["n"]
        title = f"{set_name} questions"
        for suffix, text in SET_TITLES.items():
            if set_name.endswith("_" + suffix):
                title = f"{set_name.removesuffix('_' + suffix)} questions {text.format(c=cutoff.isoformat())}"
        lines += [f"### {title} (n={n})", "",
                  "| model | BERTScore F1 | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | eval CE | words |",
                  "|---|---|---|---|---|---|---|---|"]
        for model_name, m in by_model.items():
            lines.append(f"| {labels.get(model_name, model_name)} | {_cell(m, 'bertscore_f1', '.3f')} "
                         f"| {_cell(m, 'rouge1', '.3f')} | {_cell(m, 'rouge2', '.3f')} | {_cell(m, 'rougeL', '.3f')} "
                         f"| {_cell(m, 'bleu', '.2f')} | {_cell(m, 'cross_entropy', '.3f')} "
                         f"| {m['answer_words']:.1f} |")
        lines.append("")
    for key, reason in (skipped or {}).items():
        lines.append(f"- **{labels.get(key, key)}: skipped** ({reason})")
    if skipped:
        lines.append("")
    lines.append("Each metric with its 95% bootstrap interval [lo, hi] over resampled questions. ROUGE is the F "
                 "measure (stemmed); BLEU is sacrebleu's corpus score (0-100); BERTScore is F1; eval CE is the "
                 "token-weighted cross-entropy of the reference answers (local models only); words is the mean "
                 "answer length. The RAG row's retrieval hit rate (the question's paper among the retrieved) is "
                 "in metrics/evaluate.json.")
    return "\n".join(lines) + "\n"


def scores_csv(metrics: dict[str, Any]) -> str:
    """The DVC plot's data: one bar per set/model/metric (BLEU / 100, so all bars share a 0-1 scale)."""
    lines = ["label,set,model,metric,score,lo,hi"]
    for set_name, by_model in metrics.items():
        for model_name, m in by_model.items():
            for key in PLOT_METRICS:
                scale = 0.01 if key == "bleu" else 1.0
                lo, hi = m.get(f"{key}_ci95", [m[key], m[key]])
                metric = "bleu/100" if key == "bleu" else key
                lines.append(f"{set_name}/{model_name}/{metric},{set_name},{model_name},{metric},"
                             f"{m[key] * scale:.6f},{lo * scale:.6f},{hi * scale:.6f}")
    return "\n".join(lines) + "\n"


def write_outputs(metrics: dict[str, Any], predictions: list[dict[str, Any]], labels: dict[str, str],
                  cutoff: dt.date, skipped: dict[str, str]) -> str:
    """Writes the four declared outputs (values rounded as every stage rounds them); returns the table."""
    write_json(METRICS, rounded(metrics))
    write_jsonl(PREDICTIONS, rounded(predictions))
    atomic_write_text(TABLE, markdown_table(metrics, labels, cutoff, skipped))
    atomic_write_text(SCORES_PLOT, scores_csv(metrics))
    return TABLE.read_text()
