"""Model-card stage: the adapter's README.md, written from the pipeline's own outputs (no hand-typed numbers).

    python -m stages.model_card       # from the repository (or workspace) root, after evaluate

Reads  params.yaml (`model_card:`, base.model/system_prompt), metrics/{scrape,generate,validate,train,evaluate}.json,
       artifacts/train/adapter/lineage.json (hyper-parameters, hardware, wall time, commit, data hashes),
       plots/train/{train,eval}_loss.csv, artifacts/validate/{train,eval}.jsonl (the kept pairs: their generator
       model, prompt and paper), artifacts/scrape/papers.jsonl (authors and DOIs of those papers, for the CC-BY 4.0
       attribution), dvc.lock (data hashes of the stages before).
Writes artifacts/model_card/README.md (a `huggingface_hub.ModelCard`: YAML metadata with a model-index of the
       evaluation results + Markdown) and artifacts/model_card/loss.png (the loss curve; with no matplotlib the
       card carries the loss as a table instead). The export stage copies both next to the adapter.

Every number in the card is read from those files; what the pipeline did not measure (e.g. energy, when train ran
without codecarbon) is stated as not measured, never estimated by hand.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import atomic_write_text, read_jsonl
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "model_card"
BASE_KEYS = ("model", "system_prompt")

OUT_DIR = Path("artifacts/model_card")
CARD = OUT_DIR / "README.md"
LOSS_PNG = OUT_DIR / "loss.png"
METRICS = {name: Path(f"metrics/{name}.json") for name in ("scrape", "generate", "validate", "train", "evaluate")}
LINEAGE = Path("artifacts/train/adapter/lineage.json")
LOSS_CSV = {"train": Path("plots/train/train_loss.csv"), "eval": Path("plots/train/eval_loss.csv")}
PAPERS = Path("artifacts/scrape/papers.jsonl")
PAIRS = (Path("artifacts/validate/train.jsonl"), Path("artifacts/validate/eval.jsonl"))
DVC_LOCK = Path("dvc.lock")

# metric key in metrics/evaluate.json -> (column title, decimals)
SCORE_COLUMNS = {"bertscore_f1": ("BERTScore F1", 4), "rouge1": ("ROUGE-1", 4), "rouge2": ("ROUGE-2", 4),
                 "rougeL": ("ROUGE-L", 4), "bleu": ("BLEU", 2), "cross_entropy": ("eval CE", 4),
                 "answer_words": ("answer words", 1)}
NOT_DATA = ("metrics/", "cache/", "reports/", "plots/")  # outs that are not data (the lineage table skips them)
METHOD_NAMES = {"lora": "LoRA", "lora_plus": "LoRA+", "dora": "DoRA", "qlora": "QLoRA", "loreft": "LoReFT"}


@dataclass(frozen=True)
class ModelCardParams:
    title: str
    license: str  # the adapter's license id on the Hub (e.g. llama3.1 for a Llama 3.1 derivative)
    language: tuple[str, ...]

    def check(self) -> None:
        if not self.title.strip() or not self.license.strip():
            raise ValueError("params: `model_card.title` and `model_card.license` must not be empty")


PARAMS_CLASS = ModelCardParams


@dataclass
class CardInputs:
    """Everything the card is filled from (read by `read_inputs`, or built by a test)."""

    metrics: dict[str, dict[str, Any]]
    lineage: dict[str, Any]
    loss: dict[str, list[tuple[float, float]]]
    papers: list[dict[str, Any]]  # the papers the kept pairs came from
    pairs: list[dict[str, Any]]  # the validated pairs (train + eval): generator model, prompt id, doi
    data_hashes: dict[str, str]  # path -> md5, from dvc.lock


def read_loss(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def read_inputs() -> CardInputs:
    missing = [str(p) for p in (*METRICS.values(), LINEAGE, PAPERS) if not p.exists()]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: run the pipeline up to evaluate first "
                         "(dvc repro evaluate)")
    metrics = {}
    for name, path in METRICS.items():
        try:
            metrics[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg})") from None
    pairs = [r for path in PAIRS if path.exists() for r in read_jsonl(path)]
    used = {r.get("doi") for r in pairs} - {None}
    papers = [p for p in read_jsonl(PAPERS) if not used or p.get("doi") in used]
    hashes: dict[str, str] = {}
    if DVC_LOCK.exists():
        import yaml

        lock = (yaml.safe_load(DVC_LOCK.read_text()) or {}).get("stages") or {}
        for stage in ("scrape", "generate", "validate", "train"):
            entry = lock.get(stage) or {}
            for out in entry.get("outs", []):
                if not out["path"].startswith(NOT_DATA):
                    hashes[out["path"]] = out.get("md5") or out.get("hash")
    return CardInputs(metrics=metrics, lineage=json.loads(LINEAGE.read_text()),
                      loss={k: read_loss(p) for k, p in LOSS_CSV.items()}, papers=papers, pairs=pairs,
                      data_hashes=hashes)


def loss_png(loss: dict[str, list[tuple[float, float]]], path: Path) -> bool:
    """Plot the loss curve; False when matplotlib is missing or there is nothing to plot."""
    if not any(loss.values()):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in loss.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if name == "eval" else None, markersize=4, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no timestamp in the file: same curve, same bytes
    plt.close(fig)
    tmp.replace(path)
    return True


def _fmt_int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _fmt(value, 1)


def _fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def model_label(name: str, base_model: str) -> str:
    return {"fine_tuned": "fine-tuned (this adapter)", "base": f"base ({base_model})"}.get(name, name)


def metrics_table(evaluate: dict[str, Any], base_model: str) -> str:
    lines: list[str] = []
    for set_name, by_model in evaluate.items():
        if not isinstance(by_model, dict) or not by_model:
            continue
        models = {m: v for m, v in by_model.items() if isinstance(v, dict)}
        order = {"fine_tuned": 0, "base": 1}  # this adapter, its base, then the rivals as evaluate named them
        models = dict(sorted(models.items(), key=lambda kv: (order.get(kv[0], 2), kv[0])))
        if not models:
            continue
        cols = [k for k in SCORE_COLUMNS if any(k in v for v in models.values())]
        n = next(iter(models.values())).get("n")
        lines += [f"**{set_name} questions** (n={n})", "",
                  "| model | " + " | ".join(SCORE_COLUMNS[c][0] for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name, m in models.items():
            cells = []
            for c in cols:
                cell = _fmt(m.get(c), SCORE_COLUMNS[c][1])
                ci = m.get(f"{c}_ci95")
                if ci and len(ci) == 2:
                    cell += f" [{_fmt(ci[0], SCORE_COLUMNS[c][1])}, {_fmt(ci[1], SCORE_COLUMNS[c][1])}]"
                cells.append(cell)
            lines.append(f"| {model_label(name, base_model)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def hyperparameter_rows(train: dict[str, Any], base: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [("method", METHOD_NAMES.get(train.get("method"), train.get("method")))]
    method = train.get("method")
    if method == "loreft" and isinstance(train.get("loreft"), dict):
        rows += [(f"loreft.{k}", v) for k, v in train["loreft"].items()]
    elif isinstance(train.get("lora"), dict):
        rows += [(f"lora.{k}", v) for k, v in train["lora"].items()]
    if method == "lora_plus":
        rows.append(("loraplus_lr_ratio", train.get("loraplus_lr_ratio")))
    for key in ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
                "neftune_noise_alpha", "batch_size", "grad_accum", "epochs", "precision", "pad_token",
                "padding_side", "completion_only_loss", "max_length", "group_by_length"):
        if key in train:
            rows.append((key, train[key]))
    if "max_length" in (base or {}):  # one conversation-length limit for training and every eval CE
        rows.append(("max_length", base["max_length"]))
    return rows


def _value(v: Any) -> str:
    """A table cell: lists joined, null as "off", and `|` escaped (it would end the cell)."""
    if isinstance(v, (list, tuple)):
        text = ", ".join(map(str, v)) if v else "(none)"
    elif v is None:
        text = "off"
    else:
        text = str(v)
    return f"`{text}`".replace("|", "\\|") if "|" in text or "<" in text else text


def eval_results(evaluate: dict[str, Any]):
    """model-index entries for the fine-tuned model (the Hub shows them): the exact values of the metrics file."""
    from huggingface_hub import EvalResult

    names = {"bertscore_f1": "BERTScore F1", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bleu": "BLEU",
             "cross_entropy": "eval cross-entropy"}
    out = []
    for set_name, by_model in evaluate.items():
        m = by_model.get("fine_tuned") if isinstance(by_model, dict) else None
        if not isinstance(m, dict):
            continue
        for key, title in names.items():
            if isinstance(m.get(key), (int, float)):
                out.append(EvalResult(task_type="question-answering", task_name="Question answering",
                                      dataset_type=f"qrb-{set_name}", dataset_name=f"{set_name} questions",
                                      metric_type=key, metric_name=title, metric_value=m[key]))
    return out


def render(inp: CardInputs, p: ModelCardParams, base: dict[str, Any], has_png: bool) -> str:
    """Core: the card's full text (YAML metadata + Markdown), from the inputs only."""
    from huggingface_hub import ModelCardData

    sc, gen, val, tr, ev = (inp.metrics[k] for k in ("scrape", "generate", "validate", "train", "evaluate"))
    lin = inp.lineage
    train_p = (lin.get("params") or {}).get("train") or {}
    base_p = (lin.get("params") or {}).get("base") or {}
    method = METHOD_NAMES.get(train_p.get("method"), train_p.get("method"))
    base_model = lin.get("base_model") or base["model"]
    date_from, date_to = sc.get("date_from"), sc.get("date_to")
    generators = Counter(str(r.get("model")) for r in inp.pairs if r.get("model"))
    generator = ", ".join(generators) or "unknown (the pairs carry no generator name)"
    prompts = Counter(str(r.get("prompt_id")) for r in inp.pairs if r.get("prompt_id"))
    kept = val.get("rows_out", {})
    peft_lib = train_p.get("method") != "loreft"

    data = ModelCardData(
        language=list(p.language), license=p.license, base_model=base_model if not Path(base_model).exists()
        else None, library_name="peft" if peft_lib else None, pipeline_tag="text-generation",
        tags=["quantum-physics", "question-answering", "lora" if peft_lib else "reft", "qrb"],
        model_name=p.title, eval_results=eval_results(ev) or None)

    hours = lin.get("wall_s") / 3600 if isinstance(lin.get("wall_s"), (int, float)) else None
    hw = lin.get("hardware") or {}
    cpu = ", ".join(str(x) for x in (hw.get("processor"), f"{hw['cpus']} cores" if hw.get("cpus") else None,
                                     hw.get("platform")) if x)
    device = f"{hw.get('gpu_count') or 1} x {hw['gpu']}" if hw.get("gpu") else f"CPU ({cpu or 'no details recorded'})"
    emissions = lin.get("emissions") or tr.get("emissions")
    if isinstance(emissions, dict) and emissions.get("energy_kwh") is not None:
        energy = (f"{emissions['energy_kwh']:.4f} kWh, {emissions.get('co2_kg', float('nan')):.4f} kg CO2-eq "
                  f"(measured by codecarbon{', ' + emissions['country'] if emissions.get('country') else ''})")
    else:
        energy = ("not measured: the train stage ran without an energy meter (codecarbon), and this card does "
                  "not estimate it")

    L: list[str] = [f"# {p.title}", ""]
    L += [f"A {method} adapter of `{base_model}` that answers questions about research published in the journal "
          f"*Quantum* between {date_from} and {date_to}. It was fine-tuned on {kept.get('train')} question-answer "
          f"pairs that `{generator}` generated from {gen.get('papers_with_pairs', gen.get('papers'))} papers, and "
          f"evaluated on {kept.get('eval')} held-out pairs from other papers and on a fixed set of golden "
          "questions. This card was written by the pipeline's `model_card` stage from its own outputs.", ""]

    L += ["## Model details", "",
          f"- **Base model:** `{base_model}`",
          f"- **Adapter:** {method}; {tr.get('trainable_params'):,} trainable of {tr.get('total_params'):,} "
          "parameters" if isinstance(tr.get("trainable_params"), int) and isinstance(tr.get("total_params"), int)
          else f"- **Adapter:** {method}",
          f"- **Language:** {', '.join(p.language)}",
          f"- **License:** {p.license} (the adapter); the papers it learned from are CC-BY 4.0 (see below)",
          f"- **System prompt** (used in training, evaluation and serving): \"{base['system_prompt']}\"",
          f"- **Built by:** the quantum-research-bot pipeline at commit `{lin.get('git_commit') or 'not a git checkout'}`"
          + (" (with uncommitted changes)" if lin.get("git_dirty") else ""), ""]

    L += ["## Intended use and limits", "",
          "- **Intended use:** asking about the content of recent *Quantum* papers (results, methods, definitions, "
          "what is new) as a research aid, with the papers at hand to check the answers.",
          f"- **Knowledge window:** papers published {date_from} to {date_to}; the model knows nothing newer and "
          "only what these abstracts and their generated pairs say.",
          f"- **Synthetic training data:** the question-answer pairs were written by `{generator}`, not by the "
          "papers' authors, and can carry its errors; validation checked grounding in the paper text, not truth.",
          "- **Not for:** citations, authoritative claims, or safety-relevant decisions. It can state plausible but "
          "wrong facts (hallucinate), mix up papers, and inherits the base model's biases and limits.",
          "- **Evaluation** compares against reference answers with overlap and embedding metrics (below); those do "
          "not measure factual correctness.", ""]

    L += ["## How to use", "",
          "From a pipeline workspace: `qrb ask \"…\"`, `qrb chat`, or `qrb serve` (an OpenAI-compatible API on "
          "127.0.0.1 with a web chat page).", ""]
    if peft_lib:
        L += ["```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")  # carries the added pad token",
              f"model = AutoModelForCausalLM.from_pretrained(\"{base_model}\")",
              "model.resize_token_embeddings(len(tokenizer))  # qrb.chat.resize_for_tokenizer does it the same way",
              "model = PeftModel.from_pretrained(model, \"<this folder>\")", "```", ""]

    L += ["## Training data", "",
          "| | |", "|---|---|",
          f"| source | quantum-journal.org papers (title, abstract, metadata{', arXiv full text' if sc.get('full_text_fetched') else ''}) |",
          f"| publication window | {date_from} to {date_to} |",
          f"| papers scraped | {sc.get('papers_kept')} ({sc.get('requests')} requests, {sc.get('errors')} errors) |",
          f"| generator model | `{generator}` |",
          f"| prompts (kept pairs per prompt) | {', '.join(f'`{k}` {v}' for k, v in sorted(prompts.items()))} |",
          f"| pairs generated | {gen.get('pairs_raw')} ({gen.get('duplicates_exact', 0) + gen.get('duplicates_near', 0)} duplicates removed, {gen.get('pairs')} kept) |",
          f"| generation tokens / cost | {gen.get('total_tokens'):,} tokens, USD {gen.get('cost_usd', 0):.2f} |"
          if isinstance(gen.get("total_tokens"), int) else "| generation tokens / cost | n/a |",
          f"| validation | {val.get('rows_quarantined')} rows quarantined (fail rate {_fmt(val.get('fail_rate'), 4)}); gate {'passed' if val.get('gate_passed') else 'FAILED'} |",
          f"| train / eval pairs | {kept.get('train')} / {kept.get('eval')} (split by paper: {gen.get('train_papers')} / {gen.get('eval_papers')} papers) |",
          ""]

    L += ["## Training procedure", "", "| hyper-parameter | value |", "|---|---|"]
    L += [f"| {k} | {_value(v)} |" for k, v in hyperparameter_rows(train_p, base_p)]
    L += [f"| seed | {lin.get('seed')} |", ""]
    L += [f"Result: {tr.get('steps')} optimizer steps, final train loss {_fmt(tr.get('train_loss'), 4)}, "
          f"token-weighted eval cross-entropy {_fmt(tr.get('eval_ce'), 4)}.", ""]

    L += ["### Loss curve", ""]
    train_loss, eval_loss = dict(inp.loss.get("train", [])), dict(inp.loss.get("eval", []))
    if has_png:  # the picture, and the (few) eval points as numbers
        L += [f"![Train and eval loss]({LOSS_PNG.name})", "", "| step | eval loss |", "|---|---|"]
        L += [f"| {step:g} | {_fmt(v, 4)} |" for step, v in sorted(eval_loss.items())]
    else:  # no matplotlib: the whole curve as a table
        L += ["| step | train loss | eval loss |", "|---|---|---|"]
        for step in sorted(set(train_loss) | set(eval_loss)):
            L.append(f"| {step:g} | {_fmt(train_loss.get(step), 4)} | {_fmt(eval_loss.get(step), 4)} |")
    L.append("")

    L += ["## Evaluation", "",
          "Answers generated greedily by each model for the same questions, scored against the reference answers. "
          "BERTScore F1, ROUGE-1 and ROUGE-L carry their 95% bootstrap interval; BLEU is sacrebleu's corpus score "
          "(0-100); eval CE is the token-weighted cross-entropy of the reference answers (lower is better).", ""]
    L += [metrics_table(ev, base_model)]

    L += ["## Compute", "",
          f"- **Hardware:** {device}",
          f"- **Training time:** {_fmt(hours, 3)} hours ({_fmt(lin.get('wall_s'), 1)} s wall)",
          f"- **Tokens seen:** {_fmt_int(lin.get('tokens_seen') or tr.get('tokens_seen'))}",
          f"- **Energy and emissions:** {energy}", ""]

    versions = lin.get("versions") or {}
    L += ["## Lineage", "",
          f"- **Commit:** `{lin.get('git_commit') or 'not a git checkout'}`" + (" (dirty)" if lin.get("git_dirty") else ""),
          *([f"- **Adapter created:** {lin['created_utc']}"] if lin.get("created_utc") else []),
          "- **Libraries:** " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), "",
          "| data | md5 (dvc.lock) |", "|---|---|"]
    hashes = {k: v for k, v in {**inp.data_hashes, **(lin.get("inputs") or {})}.items()
              if v and not k.startswith(NOT_DATA)}
    L += [f"| `{k}` | `{v}` |" for k, v in sorted(hashes.items())]
    if lin.get("data_sha256"):
        L.append(f"| training data (sha256 of the rows) | `{lin['data_sha256']}` |")
    L.append("")

    L += ["## License and attribution", "",
          f"The adapter is released under `{p.license}`. The training data was derived from the following "
          f"{len(inp.papers)} papers published in *Quantum* (quantum-journal.org) under the Creative Commons "
          "Attribution 4.0 International license (CC-BY 4.0, https://creativecommons.org/licenses/by/4.0/); "
          "question-answer pairs were generated from their titles and abstracts (changes were made).", ""]
    for paper in sorted(inp.papers, key=lambda x: (x.get("published") or "", x.get("doi") or "")):
        authors = paper.get("authors") or []
        who = ", ".join(authors) if authors else "Authors as listed at the DOI"
        doi = paper.get("doi")
        ref = f"https://doi.org/{doi}" if doi else paper.get("url", "")
        lic = paper.get("license") or "CC-BY-4.0"
        L.append(f"- {who}. *{paper.get('title')}*. {paper.get('citation') or 'Quantum'} {ref} ({lic})")
    L.append("")

    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(L)))


def run(base: dict[str, Any], p: ModelCardParams, args) -> None:
    inputs = read_inputs()
    has_png = loss_png(inputs.loss, LOSS_PNG)
    if not has_png:
        LOSS_PNG.unlink(missing_ok=True)
    text = render(inputs, p, base, has_png)
    atomic_write_text(CARD, text)
    log.info("model card written to %s (%d papers attributed%s)", CARD, len(inputs.papers),
             ", loss curve in " + str(LOSS_PNG) if has_png else "")



def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
