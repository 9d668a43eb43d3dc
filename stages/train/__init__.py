"""Train stage: a LoRA+ (or LoRA / DoRA / QLoRA / LoReFT) adapter on the validated QA pairs, the model card's recipe.

    python -m stages.train            # from the repository (or workspace) root
    accelerate launch --config_file configs/accelerate/ddp.yaml -m stages.train     # multi-GPU (rank 0 writes)
    accelerate launch --multi_gpu --num_processes 2 -m stages.train                   # CPU smoke: 2 gloo ranks

Reads  params.yaml (`train:` and base.seed/model/system_prompt/hf_offline), artifacts/validate/dataset
       (a datasets.DatasetDict with "train" and "eval" splits of question/answer pairs), and with `train.text.share`
       > 0 artifacts/scrape/papers.jsonl (the training papers' text: see `trainer`).
Writes artifacts/train/adapter/ (standard PEFT folder + tokenizer with the added pad token + lineage.json; for
       loreft the native qrb.loreft layout instead of PEFT's), metrics/train.json (eval CE, train loss, tokens/s,
       trainable parameters), reports/train.json (all of it: padding fraction, peak memory, steps, energy, the
       checkpoint key), dvclive/ (DVCLive: metrics.json the last logged values, plots/metrics/<name>.tsv each
       logged value against the optimizer step, params.yaml the SFTConfig; `train.report_to` also sends them to
       wandb, mlflow or tensorboard, configured by their own environment variables), and checkpoints in
       cache/train/<key>/ (key = hash of params + data + base model; persisted by DVC, so a killed run resumes
       where it stopped and a run with other params or data never picks them up; removed after success).

The recipe (see params.yaml): LoRA r=8/alpha=16/dropout=0.1 on attention + MLP projections with A Kaiming-uniform
and B zero, the full embedding matrix trained (modules_to_save, not lm_head), LoRA+ (lr of B = 8 x lr of A),
AdamW with weight decay 0.01, cosine schedule, grad clip 0.3, NEFTune, an added pad token with right padding, and
loss on the answer and end-of-turn tokens only (tokenized through the base model's own chat template by
qrb.model.encode_pair, as every eval CE is), length-grouped batches. NEFTune noise is scaled per sequence by its real
(unpadded) length, alpha/sqrt(L_i * d), as in the NEFTune paper, instead of transformers' alpha/sqrt(padded_len * d).
In bf16 every trainable tensor is an fp32 master (bf16 autocast computes); gradient checkpointing is a param. On a
base that ties embed_tokens and lm_head (SmolLM2), the trained embedding copy unties the model: lm_head stays frozen.
Optionally (`train.text`) the training papers' own text and rule-based rewrites of it train beside the QA rows, with
the loss on every token. The loss is trl's; lm_head runs only on the labelled positions (see the trainer).

This module stays light (no torch import). The parts: `model` (tokenizer, adapter configs, model, LoRA+
optimizer), `trainer` (the QA and papers' text rows, SFTConfig, NEFTune hook, the `train()` core), `lineage`
(fingerprints, checkpoint key, energy meter, lineage.json), `run` (the files: dataset in; adapter, metrics, loss
plots out).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SECTION = "train"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline", "max_length")


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
    layers: tuple[int, ...]   # negative = from the end (before the first layer: left out); [] = every layer
    positions: str            # "all" or "f<n>+l<n>" (first/last n prompt tokens)
    dropout: float


@dataclass(frozen=True)
class TextParams:
    share: float              # of the training rows, the papers' text (0 = off)
    rewrites: int             # rule-based rewrites of each paper's text beside the original
    order: Literal["mixed", "qa_first", "text_first"]


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
    precision: Literal["bf16", "fp16", "fp32", "bf16_cpu"]  # bf16_cpu: bf16 autocast without a GPU
    gradient_checkpointing: bool  # recompute activations in backward: less memory, ~30% more compute
    pad_token: str
    padding_side: Literal["right", "left"]
    completion_only_loss: bool
    eval_batch_size: int
    logging_steps: int
    group_by_length: bool
    checkpoint_steps: int
    emissions_country: str | None
    report_to: Literal["dvclive", "wandb", "mlflow", "tensorboard", "none"]  # DVCLive's files are written anyway
    text: TextParams
    gate: bool  # hold back a few rows, then calibrate the confidence below which the adapter declines (train/gate.py)

    @property
    def bf16(self) -> bool:
        return self.precision in ("bf16", "bf16_cpu")

    def check(self) -> None:
        if self.lora.r < 1:
            raise ValueError("params: `train.lora.r` must be a positive integer")
        if not 0 <= self.lora.dropout < 1:
            raise ValueError("params: `train.lora.dropout` must be in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("params: `train.warmup_ratio` must be in [0, 1)")
        for key in ("learning_rate", "batch_size", "grad_accum", "epochs", "eval_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"params: `train.{key}` must be positive")
        if self.checkpoint_steps < 0:
            raise ValueError("params: `train.checkpoint_steps` must be >= 0 (0 = no checkpoints)")
        if self.loreft.rank < 1:
            raise ValueError("params: `train.loreft.rank` must be a positive integer")
        if not re.match(r"^(all|f\d+\+l\d+)$", self.loreft.positions):
            raise ValueError("params: `train.loreft.positions` must be 'all' or 'f<n>+l<n>' (e.g. f7+l7)")
        if not 0 <= self.text.share < 1 or self.text.rewrites < 0:
            raise ValueError("params: `train.text.share` must be in [0, 1) and `train.text.rewrites` >= 0")
        if self.method == "qlora" and self.precision == "fp32":
            raise ValueError("params: `train.precision` must be bf16 or fp16 with method qlora (nf4 compute dtype)")


PARAMS_CLASS = TrainParams
