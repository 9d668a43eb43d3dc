"""Train stage: a LoRA+ (or LoRA / DoRA / QLoRA / LoReFT) adapter on the validated QA pairs, the model card's recipe.

    python -m stages.train            # from the repository (or workspace) root
    accelerate launch --config_file configs/accelerate/ddp.yaml -m stages.train     # multi-GPU (rank 0 writes)
    accelerate launch --multi_gpu --num_processes 2 -m stages.train                   # CPU smoke: 2 gloo ranks

Reads  params.yaml (`train:` and base.seed/model/system_prompt/hf_offline), artifacts/validate/dataset
       (a datasets.DatasetDict with "train" and "eval" splits of question/answer pairs).
Writes artifacts/train/adapter/ (standard PEFT folder + tokenizer with the added pad token + lineage.json; for
       loreft the native qrb.loreft layout instead of PEFT's), metrics/train.json (eval CE, tokens/s, padding
       fraction, peak memory), plots/train/train_loss.csv, plots/train/eval_loss.csv, and checkpoints in
       cache/train/<key>/ (key = hash of params + data + base model; persisted by DVC, so a killed run resumes
       where it stopped and a run with other params or data never picks them up; removed after success).

The recipe (see params.yaml): LoRA r=8/alpha=16/dropout=0.1 on attention + MLP projections with A Kaiming-uniform
and B zero, the full embedding matrix trained (modules_to_save, not lm_head), LoRA+ (lr of B = 8 x lr of A),
AdamW with weight decay 0.01, cosine schedule, grad clip 0.3, NEFTune, an added pad token with right padding, and
loss on the answer tokens only (trl prompt/completion format through the chat template), length-grouped
batches. NEFTune noise is scaled per sequence by its real (unpadded) length, alpha/sqrt(L_i * d), as in the
NEFTune paper, instead of transformers' alpha/sqrt(padded_len * d).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qrb.errors import ConfigError, DataError
from qrb.io import atomic_write_text, write_json
from qrb.params import read_yaml
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "train"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline")

DATASET_DIR = Path("artifacts/validate/dataset")
ADAPTER_DIR = Path("artifacts/train/adapter")
METRICS = Path("metrics/train.json")
TRAIN_LOSS_PLOT = Path("plots/train/train_loss.csv")
EVAL_LOSS_PLOT = Path("plots/train/eval_loss.csv")
CHECKPOINT_ROOT = Path("cache/train")


@dataclass(frozen=True)
class LoraParams:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    init: Literal["kaiming", "gaussian"]


@dataclass(frozen=True)
class LoreftParams:
    rank: int
    layers: tuple[int, ...]   # empty = every decoder layer
    positions: str            # "all" or "f<n>+l<n>" (first/last n prompt tokens)
    dropout: float


@dataclass(frozen=True)
class TrainParams:
    method: Literal["lora", "lora_plus", "dora", "qlora", "loreft"]
    lora: LoraParams
    loreft: LoreftParams
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
    group_by_length: bool
    checkpoint_steps: int
    emissions_country: str | None

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
        if self.checkpoint_steps < 0:
            raise ValueError("params: `train.checkpoint_steps` must be >= 0 (0 = no checkpoints)")
        if self.loreft.rank < 1:
            raise ValueError("params: `train.loreft.rank` must be a positive integer")
        if not re.match(r"^(all|f\d+\+l\d+)$", self.loreft.positions):
            raise ValueError("params: `train.loreft.positions` must be 'all' or 'f<n>+l<n>' (e.g. f7+l7)")
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


def loreft_config(p: TrainParams, model, tokenizer):
    from qrb.loreft import LoreftConfig, decoder_layers, header_ids_for

    n_layers = len(decoder_layers(model))
    layers = list(p.loreft.layers) or list(range(n_layers))
    return LoreftConfig(hidden_size=model.config.hidden_size, layers=layers, rank=p.loreft.rank,
                        positions=p.loreft.positions, dropout=p.loreft.dropout,
                        header_ids=header_ids_for(tokenizer) if p.loreft.positions != "all" else [],
                        pad_token_id=tokenizer.pad_token_id)


def build_model(base: dict[str, Any], p: TrainParams, tokenizer, device: str):
    """Base model (+ resized embeddings for the pad token) wrapped with the adapter. Seeds before the adapter init."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from qrb.chat import load_causal_lm, resize_for_tokenizer, torch_dtype

    kwargs: dict[str, Any] = {}
    if p.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("method qlora needs bitsandbytes (pip install bitsandbytes) on a CUDA GPU") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(p.precision))
    model = load_causal_lm(base["model"], dtype=torch_dtype(p.precision), **kwargs)
    resize_for_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if p.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    set_seed(base["seed"])  # the adapter init runs here, before Trainer seeds
    if p.method == "loreft":  # native: base frozen, interventions only (the embedding matrix is not trained)
        from qrb import loreft

        model = loreft.attach(model, loreft_config(p, model, tokenizer))
    else:
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

    ckpt = p.checkpoint_steps > 0
    return SFTConfig(
        output_dir=output_dir, seed=base["seed"], data_seed=base["seed"],
        per_device_train_batch_size=p.batch_size, per_device_eval_batch_size=p.eval_batch_size,
        gradient_accumulation_steps=p.grad_accum, num_train_epochs=p.epochs,
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, optim="adamw_torch",
        neftune_noise_alpha=None,  # ours, per real sequence length: see neftune_per_length
        bf16=p.precision == "bf16", fp16=p.precision == "fp16",
        max_length=p.max_length, completion_only_loss=p.completion_only_loss, packing=False,
        pad_token=None, label_names=["labels"], logging_steps=p.logging_steps,
        train_sampling_strategy="group_by_length" if p.group_by_length else "random",
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps" if ckpt else "no", save_steps=p.checkpoint_steps if ckpt else 500,
        save_total_limit=2 if ckpt else None, report_to="none",
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False)


def neftune_per_length(alpha: float, pad_id: int):
    """NEFTune forward hook with noise alpha/sqrt(L_i * d) per sequence, L_i its real (unpadded) length.

    transformers' hook uses the padded length of the whole batch, so padding (and length grouping) would change
    the noise each sequence gets; pad positions get none.
    """
    import torch

    def hook(module, args, output):
        if not module.training or not args:
            return output
        real = (args[0] != pad_id)
        lengths = real.sum(dim=1).clamp(min=1).to(torch.float32)
        mag = (alpha / torch.sqrt(lengths * output.size(-1))).to(output.dtype)
        noise = torch.zeros_like(output).uniform_(-1, 1) * mag[:, None, None] * real.unsqueeze(-1).to(output.dtype)
        return output + noise

    return hook


def count_params(model) -> dict[str, int]:
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    total = sum(t.numel() for t in model.parameters())
    return {"trainable_params": trainable, "total_params": total}


def data_fingerprint(dataset) -> str:
    """sha256 of the train/eval rows (what a checkpoint was trained on)."""
    h = hashlib.sha256()
    for split in sorted(dataset.keys()):
        h.update(split.encode())
        for row in dataset[split]:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """The base model's identity: its config and weight files' names and sizes (a hub id stands for itself)."""
    d = Path(path)
    if not d.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()


def checkpoint_key(base: dict[str, Any], p: TrainParams, data_sha: str) -> str:
    """Checkpoints are only resumed by a run with the very same params, data and base model."""
    blob = json.dumps({"base": {k: base[k] for k in BASE_KEYS}, "train": dataclasses.asdict(p), "data": data_sha,
                       "model": model_fingerprint(base["model"])}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def last_checkpoint(run_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None


def _peak_memory(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_mem_kind": "cuda_allocated"}
    import resource

    return {"peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_mem_kind": "cpu_max_rss"}


def _trainer_cls():
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer that counts real and padded tokens of the training batches it steps on."""

        real_tokens = 0
        padded_tokens = 0

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            if mask is None:
                mask = inputs["input_ids"] != self.processing_class.pad_token_id
            self.real_tokens += int(mask.sum())
            self.padded_tokens += int(mask.numel())
            return super().training_step(model, inputs, *args, **kwargs)

    return CountingSFTTrainer


@contextlib.contextmanager
def emissions_meter(country: str | None) -> Iterator[dict[str, Any]]:
    """Energy (kWh) and CO2-eq (kg) of the block, from codecarbon's offline tracker (no network: the grid's carbon
    intensity comes from `country`, an ISO 3166 alpha-3 code). Filled in on exit; {} when metering is off."""
    out: dict[str, Any] = {}
    if not country:
        yield out
        return
    try:
        from codecarbon import OfflineEmissionsTracker

        tracker = OfflineEmissionsTracker(country_iso_code=country, save_to_file=False, log_level="error",
                                          tracking_mode="process", measure_power_secs=15)
        tracker.start()
    except Exception as e:  # the meter must never cost a training run; the card then says "not measured"
        log.warning("train: energy not metered (codecarbon: %s)", e)
        yield out
        return
    try:
        yield out
    finally:
        kg = tracker.stop()
        data = tracker.final_emissions_data
        out.update(energy_kwh=float(data.energy_consumed), co2_kg=float(kg or 0.0), country=country,
                   cpu=getattr(data, "cpu_model", None), gpu=getattr(data, "gpu_model", None) or None)


def train(base: dict[str, Any], p: TrainParams, dataset, device: str, checkpoint_root: Path | None = None,
          callbacks: tuple = ()) -> tuple[Any, Any, dict[str, Any], list[dict]]:
    """Core: returns (model, tokenizer, metrics, trainer log history).

    With `checkpoint_root`, checkpoints go to checkpoint_root/<key> every `checkpoint_steps` and a run with the same
    key resumes from the last one (the run dir is removed after success); without it, a temp dir (no resume).
    """
    import torch

    from qrb.chat import load_tokenizer, token_weighted_ce

    tokenizer, added = prepare_tokenizer(load_tokenizer(base["model"]), p)
    model = build_model(base, p, tokenizer, device)
    counts = count_params(model)
    log.info("%s: %d trainable of %d params (%.2f%%); %d token(s) added", p.method, counts["trainable_params"],
             counts["total_params"], 100 * counts["trainable_params"] / counts["total_params"], added)
    train_ds = to_prompt_completion(dataset["train"], base["system_prompt"])
    eval_ds = to_prompt_completion(dataset["eval"], base["system_prompt"]) if "eval" in dataset else None
    data_sha = data_fingerprint(dataset)
    key = checkpoint_key(base, p, data_sha)
    with contextlib.ExitStack() as stack:
        if checkpoint_root is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qrb-train-")))
        else:
            run_dir = Path(checkpoint_root) / key
        resume = last_checkpoint(run_dir) if p.checkpoint_steps > 0 else None
        if resume:
            log.info("resuming from %s (same params, data and base model: key %s)", resume, key)
        trainer = _trainer_cls()(model=model, args=sft_config(base, p, str(run_dir), eval_ds is not None),
                                 train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                 optimizers=(build_optimizer(model, p), None), callbacks=list(callbacks) or None)
        handle = None
        if p.neftune_noise_alpha:
            emb = trainer.accelerator.unwrap_model(model).get_input_embeddings()
            handle = emb.register_forward_hook(neftune_per_length(p.neftune_noise_alpha, tokenizer.pad_token_id))
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            with emissions_meter(p.emissions_country) as emissions:
                result = trainer.train(resume_from_checkpoint=resume)
        finally:
            if handle is not None:
                handle.remove()
        wall = time.time() - t0
        is_main = trainer.accelerator.is_main_process
        reduce = trainer.accelerator.reduce
        real = int(reduce(torch.tensor(trainer.real_tokens, device=trainer.accelerator.device), "sum"))
        padded = int(reduce(torch.tensor(trainer.padded_tokens, device=trainer.accelerator.device), "sum"))
        trainer.accelerator.wait_for_everyone()
        if checkpoint_root is not None and is_main and run_dir.exists():
            shutil.rmtree(run_dir)  # done: a rerun starts fresh (dvc repro only reruns when something changed)
    tokens_seen = int(trainer.state.num_input_tokens_seen or 0)
    metrics: dict[str, Any] = {
        "method": p.method, **counts, "added_tokens": added,
        "train_loss": float(result.training_loss), "wall_s": round(wall, 2),
        "steps": int(trainer.state.global_step), "tokens_seen": tokens_seen,
        "tokens_per_s": round(real / wall, 1) if wall > 0 else None,  # real tokens stepped on in this process
        "padding_fraction": round(1 - real / padded, 4) if padded else None,
        "world_size": trainer.accelerator.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else None,
        "checkpoint_key": key, "data_sha256": data_sha, **_peak_memory(device),
        "emissions": emissions or None,
    }
    if "eval" in dataset and is_main:
        ce = token_weighted_ce(model, tokenizer, list(dataset["eval"]), base["system_prompt"],
                               batch_size=p.eval_batch_size, max_length=p.max_length)
        metrics.update(eval_ce=ce["cross_entropy"], eval_tokens=ce["tokens"])
    metrics["is_main_process"] = is_main
    return model, tokenizer, metrics, trainer.state.log_history


def lineage(base: dict[str, Any], p: TrainParams, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trust that this adapter is what its params say."""
    from importlib import metadata

    import torch

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    inputs: dict[str, Any] = {}
    lock = Path("dvc.lock")
    if lock.exists():  # dvc writes each stage's lock entry as it finishes: validate's outs are train's inputs
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("validate", {}).get("outs", []):
            inputs[out["path"]] = out.get("md5") or out.get("hash")
    status = git("status", "--porcelain")
    cuda = torch.cuda.is_available()
    return {
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
        "inputs": inputs, "data_sha256": metrics.get("data_sha256"),
        "base_model": base["model"], "base_model_fingerprint": model_fingerprint(base["model"]),
        "method": p.method, "seed": base["seed"],
        "params": {"base": {k: base[k] for k in BASE_KEYS}, SECTION: dataclasses.asdict(p)},
        "params_file": read_yaml().get(SECTION),
        "versions": {**{d: version(d) for d in ("torch", "transformers", "peft", "trl", "datasets", "accelerate",
                                                "dvc", "bitsandbytes")},
                     "python": platform.python_version()},
        "hardware": {"device": "cuda" if cuda else "cpu",
                     "gpu": torch.cuda.get_device_name(0) if cuda else None,
                     "gpu_count": torch.cuda.device_count() if cuda else 0,
                     "world_size": metrics.get("world_size"),
                     "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "wall_s": metrics.get("wall_s"), "tokens_seen": metrics.get("tokens_seen"), "steps": metrics.get("steps"),
        "resumed_from_step": metrics.get("resumed_from_step"), "checkpoint_key": metrics.get("checkpoint_key"),
        "eval_ce": metrics.get("eval_ce"), "emissions": metrics.get("emissions"),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
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


def save_adapter(model, tokenizer, p: TrainParams, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if p.method == "loreft":
        from qrb import loreft

        loreft.save(model, out)
    else:  # lm_head is not trained and the pad rows are rebuilt deterministically: don't ship a copy of them
        model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)


def run(base: dict[str, Any], p: TrainParams, args) -> None:
    from qrb.chat import require_hardware

    device = require_hardware(base["model"], "nf4" if p.method == "qlora" else p.precision)
    if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun-style ranks without a GPU: accelerate forms a gloo (MULTI_CPU) group only when told "cpu";
        # `accelerate launch --cpu` itself starts a single process in accelerate 1.15 (no mpirun hostfile)
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if not DATASET_DIR.exists():
        raise ConfigError(f"{DATASET_DIR} not found: run the validate stage first (dvc repro validate)")
    from datasets import load_from_disk

    # in memory: .map() would otherwise write cache files into validate's output folder and DVC would see it changed
    dataset = load_from_disk(str(DATASET_DIR), keep_in_memory=True)
    if len(dataset["train"]) == 0:
        raise DataError("the validated training split is empty")
    CHECKPOINT_ROOT.mkdir(parents=True, exist_ok=True)  # a DVC out (persist: true): must exist after the stage
    model, tokenizer, metrics, history = train(base, p, dataset, device, checkpoint_root=CHECKPOINT_ROOT)
    if not metrics.pop("is_main_process"):
        return  # multi-process: only rank 0 writes
    save_adapter(model, tokenizer, p, ADAPTER_DIR)
    atomic_write_text(ADAPTER_DIR / "lineage.json", json.dumps(lineage(base, p, metrics), indent=2, default=str) + "\n")
    write_json(METRICS, metrics)
    write_loss_plots(history)
    log.info("adapter written to %s; eval CE %s; %.0f tokens/s, padding %.1f%%", ADAPTER_DIR, metrics.get("eval_ce"),
             metrics["tokens_per_s"] or 0, 100 * (metrics["padding_fraction"] or 0))


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
