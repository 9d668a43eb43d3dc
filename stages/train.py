"""Train stage: a LoRA+ (or LoRA / DoRA / QLoRA) adapter on the validated QA pairs, the model card's recipe.

    python -m stages.train            # from the repository (or workspace) root

Reads  params.yaml (`train:` and base.seed/model/system_prompt/hf_offline), artifacts/validate/dataset
       (a datasets.DatasetDict with "train" and "eval" splits of question/answer pairs).
Writes artifacts/train/adapter/ (standard PEFT folder + tokenizer with the added pad token + lineage.json),
       metrics/train.json, plots/train/train_loss.csv, plots/train/eval_loss.csv.

The recipe (see params.yaml): LoRA r=8/alpha=16/dropout=0.1 on attention + MLP projections with A Kaiming-uniform
and B zero, the full embedding matrix trained (modules_to_save, not lm_head), LoRA+ (lr of B = 8 x lr of A),
AdamW with weight decay 0.01, cosine schedule, grad clip 0.3, NEFTune, an added pad token with right padding, and
loss on the answer tokens only (trl prompt/completion format through the chat template).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qrb.io import atomic_write_text, setup_logging, write_json
from qrb.params import load_stage_params, read_yaml

log = logging.getLogger(__name__)

SECTION = "train"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline")

DATASET_DIR = Path("artifacts/validate/dataset")
ADAPTER_DIR = Path("artifacts/train/adapter")
METRICS = Path("metrics/train.json")
TRAIN_LOSS_PLOT = Path("plots/train/train_loss.csv")
EVAL_LOSS_PLOT = Path("plots/train/eval_loss.csv")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    init: Literal["kaiming", "gaussian"]


@dataclass(frozen=True)
class TrainParams:
    method: Literal["lora", "lora_plus", "dora", "qlora"]
    lora: LoraParams
    loraplus_lr_ratio: float
    learning_rate: float
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    neftune_noise_alpha: float | None
    batch_size: int
    grad_accum: int
    epochs: float
    precision: Literal["bf16", "fp16", "fp32"]
    pad_token: str
    padding_side: Literal["right", "left"]
    completion_only_loss: bool
    max_length: int
    eval_batch_size: int
    logging_steps: int

    def check(self) -> None:
        if self.lora.r < 1:
            raise ValueError("params: `train.lora.r` must be a positive integer")
        if not 0 <= self.lora.dropout < 1:
            raise ValueError("params: `train.lora.dropout` must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("params: `train.warmup_ratio` must be in [0, 1)")
        for key in ("learning_rate", "batch_size", "grad_accum", "epochs", "max_length", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"params: `train.{key}` must be positive")
        if self.method == "qlora" and self.precision == "fp32":
            raise ValueError("params: `train.precision` must be bf16 or fp16 with method qlora (nf4 compute dtype)")


PARAMS_CLASS = TrainParams


def to_prompt_completion(rows, system_prompt: str):
    """trl's conversational prompt/completion format: loss on the completion (the answer) only."""
    from qrb.chat import completion_messages, prompt_messages

    return rows.map(lambda r: {"prompt": prompt_messages(system_prompt, r["question"]),
                               "completion": completion_messages(r["answer"])},
                    remove_columns=rows.column_names)


def prepare_tokenizer(tokenizer, p: TrainParams):
    """Add a dedicated pad token (never pad = eos: the model would learn to ignore end-of-turn)."""
    added = 0
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        added = tokenizer.add_special_tokens({"pad_token": p.pad_token})
    tokenizer.padding_side = p.padding_side
    return tokenizer, added


def lora_config(p: TrainParams):
    from peft import LoraConfig

    return LoraConfig(
        r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
        target_modules=list(p.lora.target_modules), modules_to_save=list(p.lora.modules_to_save) or None,
        init_lora_weights=True if p.lora.init == "kaiming" else "gaussian",  # True = A Kaiming-uniform, B zero
        use_dora=p.method == "dora", bias="none", task_type="CAUSAL_LM")


def build_model(base: dict[str, Any], p: TrainParams, tokenizer, device: str):
    """Base model (+ resized embeddings for the pad token) wrapped with the adapter. Seeds before the LoRA init."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from qrb.chat import load_causal_lm, resize_for_tokenizer, torch_dtype

    kwargs: dict[str, Any] = {}
    if p.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("train: method qlora needs bitsandbytes (pip install bitsandbytes) on a CUDA GPU") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(p.precision))
    model = load_causal_lm(base["model"], "train", dtype=torch_dtype(p.precision), **kwargs)
    resize_for_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if p.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    set_seed(base["seed"])  # the LoRA init runs here, before Trainer seeds
    model = get_peft_model(model, lora_config(p))
    if device == "cuda" and p.method != "qlora":
        model = model.to("cuda")
    torch.manual_seed(base["seed"])
    return model


def build_optimizer(model, p: TrainParams):
    """LoRA+: B matrices at loraplus_lr_ratio x lr; peft takes weight decay from loraplus_weight_decay."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    if p.method != "lora_plus":
        return None  # Trainer builds AdamW with args.weight_decay
    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=p.learning_rate,
                                     loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay)


def sft_config(base: dict[str, Any], p: TrainParams, output_dir: str, has_eval: bool):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, seed=base["seed"], data_seed=base["seed"],
        per_device_train_batch_size=p.batch_size, per_device_eval_batch_size=p.eval_batch_size,
        gradient_accumulation_steps=p.grad_accum, num_train_epochs=p.epochs,
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, optim="adamw_torch",
        neftune_noise_alpha=p.neftune_noise_alpha, bf16=p.precision == "bf16", fp16=p.precision == "fp16",
        max_length=p.max_length, completion_only_loss=p.completion_only_loss, packing=False,
        pad_token=None, label_names=["labels"], logging_steps=p.logging_steps,
        eval_strategy="epoch" if has_eval else "no", save_strategy="no", report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False)


def count_params(model) -> dict[str, int]:
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    total = sum(t.numel() for t in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def train(base: dict[str, Any], p: TrainParams, dataset, device: str) -> tuple[Any, Any, dict[str, Any], list[dict]]:
    """Core: returns (peft model, tokenizer, metrics, trainer log history)."""
    from trl import SFTTrainer

    from qrb.chat import load_tokenizer, token_weighted_ce

    tokenizer, added = prepare_tokenizer(load_tokenizer(base["model"], "train"), p)
    model = build_model(base, p, tokenizer, device)
    counts = count_params(model)
    log.info("%s: %d trainable of %d params (%.2f%%); %d token(s) added", p.method, counts["trainable_params"],
             counts["total_params"], 100 * counts["trainable_params"] / counts["total_params"], added)
    train_ds = to_prompt_completion(dataset["train"], base["system_prompt"])
    eval_ds = to_prompt_completion(dataset["eval"], base["system_prompt"]) if "eval" in dataset else None
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="qrb-train-") as tmp:
        trainer = SFTTrainer(model=model, args=sft_config(base, p, tmp, eval_ds is not None),
                             train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                             optimizers=(build_optimizer(model, p), None))
        result = trainer.train()
    wall = time.time() - t0
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0) or _count_tokens(trainer.train_dataset, p.epochs)
    metrics: dict[str, Any] = {
        "method": p.method, **counts, "added_tokens": added,
        "train_loss": float(result.training_loss), "wall_s": round(wall, 2),
        "steps": int(trainer.state.global_step), "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / wall, 1) if wall > 0 else None,
    }
    if "eval" in dataset:
        ce = token_weighted_ce(model, tokenizer, list(dataset["eval"]), base["system_prompt"],
                               batch_size=p.eval_batch_size, max_length=p.max_length)
        metrics.update(eval_ce=ce["cross_entropy"], eval_tokens=ce["tokens"])
    return model, tokenizer, metrics, trainer.state.log_history


def _count_tokens(ds, epochs: float) -> int:
    return int(sum(len(x) for x in ds["input_ids"]) * epochs)


def lineage(base: dict[str, Any], p: TrainParams, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trust that this adapter is what its params say."""
    import peft
    import torch
    import transformers
    import trl

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    inputs: dict[str, Any] = {}
    lock = Path("dvc.lock")
    if lock.exists():  # dvc writes each stage's lock entry as it finishes: validate's outs are train's inputs
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("validate", {}).get("outs", []):
            inputs[out["path"]] = out.get("md5") or out.get("hash")
    return {
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
        "inputs": inputs, "base_model": base["model"], "seed": base["seed"],
        "params": {"base": {k: base[k] for k in BASE_KEYS}, SECTION: dataclasses.asdict(p)},
        "params_file": read_yaml().get(SECTION),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "trl": trl.__version__, "python": platform.python_version()},
        "hardware": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "wall_s": metrics.get("wall_s"), "tokens_seen": metrics.get("tokens_seen"),
    }


def write_loss_plots(history: list[dict]) -> None:
    rows = {"loss": [], "eval_loss": []}
    for h in history:
        for key in rows:
            if key in h:
                rows[key].append((h["step"], h[key]))
    for path, key in ((TRAIN_LOSS_PLOT, "loss"), (EVAL_LOSS_PLOT, "eval_loss")):
        lines = ["step,loss"] + [f"{s},{v:.6f}" for s, v in rows[key]]
        atomic_write_text(path, "\n".join(lines) + "\n")


def main() -> None:
    setup_logging()
    base, p = load_stage_params(SECTION, PARAMS_CLASS, BASE_KEYS)
    from qrb.chat import require_hardware, set_hf_offline

    set_hf_offline(base["hf_offline"])
    device = require_hardware(base["model"], "nf4" if p.method == "qlora" else p.precision, SECTION)
    if not DATASET_DIR.exists():
        raise SystemExit(f"train: {DATASET_DIR} not found: run the validate stage first (dvc repro validate)")
    from datasets import load_from_disk

    # in memory: .map() would otherwise write cache files into validate's output folder and DVC would see it changed
    dataset = load_from_disk(str(DATASET_DIR), keep_in_memory=True)
    if len(dataset["train"]) == 0:
        raise SystemExit("train: the validated training split is empty")
    model, tokenizer, metrics, history = train(base, p, dataset, device)
    ADAPTER_DIR.mkdir(parents=True, exist_ok=True)
    # lm_head is not trained and the pad rows are rebuilt deterministically: don't ship a copy of them
    model.save_pretrained(ADAPTER_DIR, save_embedding_layers=False)
    tokenizer.save_pretrained(ADAPTER_DIR)
    atomic_write_text(ADAPTER_DIR / "lineage.json", json.dumps(lineage(base, p, metrics), indent=2, default=str) + "\n")
    write_json(METRICS, metrics)
    write_loss_plots(history)
    log.info("adapter written to %s; eval CE %s", ADAPTER_DIR, metrics.get("eval_ce"))


if __name__ == "__main__":
    main()
