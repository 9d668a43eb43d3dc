"""The train section's params and all the code that reads them: the tokenizer with its added pad token, the adapter
(LoRA family, LoReFT), the base model, the LoRA+ optimizer, the QA rows tokenized as eval CE counts them, the papers'
own text as continued-pretraining rows beside them (`train.text`: the training split's papers only, as written and
in rule-based rewrites, loss on every token, mixed with the QA rows or staged before/after them), the SFTConfig, and
`train()`, which returns the trained model and its metrics (no files written but checkpoints). A new hyper-parameter
is a field here and a key in params.yaml (`qrb.params` rejects unknown keys and types)."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qrb.errors import ConfigError, DataError

from . import hooks

log = logging.getLogger(__name__)


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


_PRONOUNS = {"we": "the authors", "our": "their", "us": "them", "ours": "theirs", "ourselves": "themselves"}
_PRONOUN_RE = re.compile(r"\b([Ww]e|[Oo]urs|[Oo]urselves|[Oo]ur|us)\b")  # "US" (a country) is left alone
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z$\\(\[])")


def third_person(sentence: str) -> str:
    """'We show our bound' -> 'The authors show their bound'."""
    def swap(m: re.Match) -> str:
        word = _PRONOUNS[m.group(0).lower()]
        return word[0].upper() + word[1:] if m.group(0)[0].isupper() else word

    return _PRONOUN_RE.sub(swap, sentence)


def versions(paper: dict, rewrites: int, seed: int) -> list[str]:
    """The paper's text as written (title, abstract, full text), then `rewrites` rule-based rewrites: sentences in
    a seeded shuffled order, "we"/"our" in the third person, the title before every sentence (odd rewrites) or once
    on top (even ones)."""
    title = paper["title"].strip()
    body = "\n\n".join(t.strip() for t in (paper.get("abstract"), paper.get("full_text")) if t and t.strip())
    out = [f"{title}\n\n{body}"]
    sentences = [third_person(s) for s in _SENTENCE_RE.split(" ".join(body.split())) if s]
    for k in range(1, rewrites + 1):
        order = sentences[:]
        random.Random(f"{seed}:{paper['doi']}:{k}").shuffle(order)
        out.append(" ".join(f"{title}: {s}" for s in order) if k % 2 else f"{title}\n\n" + " ".join(order))
    return out


def text_rows(dataset, tokenizer, p: TextParams, n_qa: int, max_length: int, seed: int) -> list[dict]:
    """`p.share` of the training rows beside n_qa QA rows: every version of every training paper (the dataset's
    `papers` split), cut into near-equal rows of at most max_length tokens, drawn in a seeded order (the pool
    repeats when it is smaller than the count asked for), each with the loss on all its tokens."""
    if "papers" not in dataset:
        raise ValueError("`train.text.share` > 0 needs the papers' text (a `papers` split of the dataset)")
    eval_dois = set(dataset["eval"]["doi"]) if len(dataset.get("eval") or []) else set()
    pool = []
    train_dois = set(dataset["train"]["doi"]) - eval_dois  # never a paper an eval row asks about: held-out stay unseen
    for paper in (r for r in dataset["papers"] if r["doi"] in train_dois):
        for text in versions(paper, p.rewrites, seed):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = -(-len(ids) // max_length)  # the fewest rows of <= max_length tokens, of near-equal lengths
            size = -(-len(ids) // max(pieces, 1))
            pool += [ids[i:i + size] for i in range(0, len(ids) - 1, size)]
    if not pool:
        raise DataError("`train.text`: no training paper's text in artifacts/scrape/papers.jsonl (DOIs differ?)")
    n, rows, rng = round(n_qa * p.share / (1 - p.share)), [], random.Random(seed)
    while len(rows) < n:
        rows += rng.sample(pool, len(pool))
    return [{"input_ids": ids, "completion_mask": [1] * len(ids)} for ids in rows[:n]]


def order_rows(qa: list, text: list, p: TextParams, epochs: float, seed: int) -> list:
    """`mixed`: one list the trainer's sampler shuffles each epoch. Staged (`qa_first`, `text_first`): every epoch
    of one part, each reshuffled, then every epoch of the other, in a list the trainer reads once, in order."""
    if p.order == "mixed":
        return qa + text
    rng = random.Random(seed)

    def unrolled(rows: list) -> list:
        out: list = []
        while len(out) < round(epochs * len(rows)):
            out += rng.sample(rows, len(rows))
        return out[:round(epochs * len(rows))]

    first, second = (qa, text) if p.order == "qa_first" else (text, qa)
    return unrolled(first) + unrolled(second)


def tokenize_rows(rows, tokenizer, system_prompt: str, max_length: int):
    """Training sequences in trl's pre-tokenized form: `input_ids` + `completion_mask` (the loss).

    Tokenized by `qrb.model.encode_pair`, the function eval cross-entropy counts with, so training and every eval
    agree token for token: the model's own chat template, the generation prompt a prefix of the sequence, and the
    loss on the answer tokens and the end-of-turn token only (trl's own prompt/completion tokenization would also
    train on what a template writes after the end of turn, e.g. ChatML's newline after <|im_end|>).
    """
    from qrb.model import encode_pair

    def encode(r):
        ids, prompt_len = encode_pair(tokenizer, system_prompt, r["question"], r["answer"], max_length)
        return {"input_ids": ids, "completion_mask": [0] * prompt_len + [1] * (len(ids) - prompt_len)}

    return rows.map(encode, remove_columns=rows.column_names)


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
    from qrb.loreft import LoreftConfig, decoder_layers, header_ids_for, resolve_layers

    try:
        layers = resolve_layers(p.loreft.layers, len(decoder_layers(model)))
    except ValueError as e:
        raise ConfigError(f"params: `train.loreft.layers`: {e}") from None
    return LoreftConfig(hidden_size=model.config.hidden_size, layers=layers, rank=p.loreft.rank,
                        positions=p.loreft.positions, dropout=p.loreft.dropout,
                        header_ids=header_ids_for(tokenizer) if p.loreft.positions != "all" else [],
                        pad_token_id=tokenizer.pad_token_id)


def build_model(base: dict[str, Any], p: TrainParams, tokenizer, device: str):
    """Base model (+ resized embeddings for the pad token) wrapped with the adapter. Seeds before the adapter init."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import set_seed

    from qrb.model import load_causal_lm, resize_for_tokenizer, torch_dtype

    kwargs: dict[str, Any] = {}
    if p.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError("method qlora needs bitsandbytes (pip install bitsandbytes) on a CUDA GPU") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(p.precision.removesuffix("_cpu")))
    model = load_causal_lm(base["model"], dtype=torch_dtype(p.precision.removesuffix("_cpu")), **kwargs)
    if device == "cpu" and p.bf16:
        hooks.fp32_attention(model)
    resize_for_tokenizer(model, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if p.method == "qlora":
        model = prepare_model_for_kbit_training(model)
    set_seed(base["seed"])  # the adapter init runs here, before Trainer seeds
    if p.method == "loreft":  # native: base frozen, interventions only (the embedding matrix is not trained)
        from qrb import loreft

        model = loreft.attach(model, loreft_config(p, model, tokenizer))
    else:
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        with warnings.catch_warnings():  # peft warns that a tied layer is in the adapter: here, on purpose
            warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True`")
            model = get_peft_model(model, lora_config(p))
        if tied and p.lora.modules_to_save:
            log.info("the base ties its input embeddings and lm_head: the adapter trains its own copy of %s and "
                     "lm_head keeps the frozen original (the model is untied; merge and export write it so)",
                     ", ".join(p.lora.modules_to_save))
    hooks.upcast_trainable_(model)
    if device == "cpu":
        hooks.word_dropout_(model)
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
    # fused: the same AdamW in one kernel per tensor; the embedding copy's dense step takes 24 ms instead of 400 on a CPU
    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=p.learning_rate, fused=True,
                                     loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay)


def sft_config(base: dict[str, Any], p: TrainParams, output_dir: str, has_eval: bool):
    import torch
    from trl import SFTConfig

    ckpt = p.checkpoint_steps > 0
    staged = p.text.share > 0 and p.text.order != "mixed"  # the rows come with their epochs unrolled, in order
    return SFTConfig(
        output_dir=output_dir, seed=base["seed"], data_seed=base["seed"],
        per_device_train_batch_size=p.batch_size, per_device_eval_batch_size=p.eval_batch_size,
        gradient_accumulation_steps=p.grad_accum, num_train_epochs=1.0 if staged else p.epochs,
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler, warmup_steps=p.warmup_ratio,
        weight_decay=p.weight_decay, max_grad_norm=p.max_grad_norm, optim="adamw_torch_fused",  # one kernel: 16x on CPU
        neftune_noise_alpha=None,  # ours, per real sequence length: see neftune_per_length
        bf16=p.bf16, fp16=p.precision == "fp16", use_cpu=p.bf16 and not torch.cuda.is_available(),
        # on purpose (trl's SFTConfig turns it on by default); transformers 5 calls it activation checkpointing
        activation_checkpointing=p.gradient_checkpointing,
        max_length=base["max_length"], completion_only_loss=p.completion_only_loss, label_names=["labels"],
        logging_steps=p.logging_steps,
        train_sampling_strategy="sequential" if staged else "group_by_length" if p.group_by_length else "random",
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps" if ckpt else "no", save_steps=p.checkpoint_steps or 500,
        save_total_limit=2 if ckpt else None, dataloader_pin_memory=False, disable_tqdm=False,
        report_to=p.report_to if p.report_to in ("wandb", "mlflow", "tensorboard") else "none")


def build_trainer(base: dict[str, Any], p: TrainParams, model, tokenizer, dataset, run_dir: Path,
                  callbacks: tuple = ()):
    """The stage's SFTTrainer on `model` (from `build_model`): tokenized rows, the recipe's SFTConfig, the LoRA+
    optimizer, and the callback that evaluates before an epoch-boundary checkpoint."""
    system, max_length = base["system_prompt"], base["max_length"]
    train_ds = tokenize_rows(dataset["train"], tokenizer, system, max_length)
    if p.text.share > 0:  # the training papers' text beside the QA rows
        from datasets import Dataset

        text = text_rows(dataset, tokenizer, p.text, len(train_ds), max_length, base["seed"])
        train_ds = Dataset.from_list(order_rows(list(train_ds), text, p.text, p.epochs, base["seed"]))
    eval_ds = tokenize_rows(dataset["eval"], tokenizer, system, max_length) if len(dataset.get("eval") or []) else None
    trainer = hooks.counting_trainer_cls()(
        model=model, args=sft_config(base, p, str(run_dir), eval_ds is not None), train_dataset=train_ds,
        eval_dataset=eval_ds, processing_class=tokenizer, optimizers=(build_optimizer(model, p), None),
        callbacks=[hooks.eval_before_boundary_save(), *callbacks])
    # SFTTrainer casts every trainable tensor of a 4-bit model (qlora) to bf16, the embedding copy included, where
    # small AdamW steps vanish: the fp32 masters go back (the optimizer holds the same Parameter objects, no state yet)
    hooks.upcast_trainable_(model)
    return trainer


def neftune(trainer, p: TrainParams, pad_id: int):
    """The per-length NEFTune hook on the input embeddings, removed when the `with` block ends (none when the alpha
    is unset)."""
    if not p.neftune_noise_alpha:
        return contextlib.nullcontext()
    emb = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
    return emb.register_forward_hook(hooks.neftune_per_length(p.neftune_noise_alpha, pad_id))  # a context manager


def train(base: dict[str, Any], p: TrainParams, dataset, device: str, checkpoint_root: Path | None = None,
          callbacks: tuple = ()) -> tuple[Any, Any, dict[str, Any], list[dict]]:
    """Core: returns (model, tokenizer, metrics, trainer log history).

    With `checkpoint_root`, checkpoints go to checkpoint_root/<key> every `checkpoint_steps` and a run with the same
    key resumes from the last one (the run dir is removed after success); without it, a temp dir (no resume).
    """
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from qrb.model import load_tokenizer, token_weighted_ce

    from .lineage import checkpoint_key, data_fingerprint, emissions_meter  # lineage imports this package's params

    tokenizer, added = prepare_tokenizer(load_tokenizer(base["model"]), p)
    model = build_model(base, p, tokenizer, device)
    counts = {"trainable_params": sum(t.numel() for t in model.parameters() if t.requires_grad),
              "total_params": sum(t.numel() for t in model.parameters())}
    log.info("%s: %d trainable of %d params (%.2f%%); %d token(s) added", p.method, counts["trainable_params"],
             counts["total_params"], 100 * counts["trainable_params"] / counts["total_params"], added)
    data_sha = data_fingerprint(dataset)
    key = checkpoint_key(base, p, data_sha)
    with tempfile.TemporaryDirectory(prefix="qrb-train-") as tmp:  # the run dir without a checkpoint root
        run_dir = Path(tmp) if checkpoint_root is None else Path(checkpoint_root) / key
        resume = get_last_checkpoint(str(run_dir)) if p.checkpoint_steps > 0 and run_dir.is_dir() else None
        if resume:
            log.info("resuming from %s (same params, data and base model: key %s)", resume, key)
        trainer = build_trainer(base, p, model, tokenizer, dataset, run_dir, callbacks)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        with neftune(trainer, p, tokenizer.pad_token_id), emissions_meter(p.emissions_country) as emissions:
            result = trainer.train(resume_from_checkpoint=resume)
        wall = time.time() - t0
        is_main = trainer.accelerator.is_main_process
        counted = torch.tensor([trainer.real_tokens, trainer.padded_tokens], device=trainer.accelerator.device)
        real, padded = map(int, trainer.accelerator.reduce(counted, "sum"))
        trainer.accelerator.wait_for_everyone()
        if checkpoint_root is not None and is_main and run_dir.exists():
            shutil.rmtree(run_dir)  # done: a rerun starts fresh (dvc repro only reruns when something changed)
    metrics: dict[str, Any] = {
        "method": p.method, **counts, "added_tokens": added,
        "train_loss": float(result.training_loss), "wall_s": round(wall, 2),
        "steps": int(trainer.state.global_step), "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "tokens_per_s": round(real / wall, 1) if wall > 0 else None,  # real tokens stepped on in this process
        "padding_fraction": round(1 - real / padded, 4) if padded else None,
        "world_size": trainer.accelerator.num_processes,
        "resumed_from_step": int(resume.rsplit("-", 1)[1]) if resume else None,
        "checkpoint_key": key, "data_sha256": data_sha, **hooks.peak_memory(device),
        "emissions": emissions or None,
    }
    if "eval" in dataset and is_main:
        ce = token_weighted_ce(model, tokenizer, list(dataset["eval"]), base["system_prompt"],
                               batch_size=p.eval_batch_size, max_length=base["max_length"])
        metrics.update(eval_ce=ce["cross_entropy"], eval_tokens=ce["tokens"])
    metrics["is_main_process"] = is_main
    return model, tokenizer, metrics, trainer.state.log_history
