"""The training core: QA rows tokenized as eval CE counts them, the papers' own text as continued-pretraining rows
beside them (`train.text`: each training paper's abstract, + full text when scraped, as written and in rule-based
rewrites, cut into max_length token rows that carry the loss on every token, mixed with the QA rows or staged
before/after them; papers of the training split only), the SFTConfig of the recipe, an SFTTrainer that counts real
and padded tokens, the per-length NEFTune hook, and `train()`, which ties them to the model of `stages.train.model`
and returns the trained model with its metrics (no files written but checkpoints)."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qrb.errors import DataError

from . import TextParams, TrainParams
from .lineage import checkpoint_key, data_fingerprint, emissions_meter
from .model import build_model, build_optimizer, count_params, prepare_tokenizer, upcast_trainable_

log = logging.getLogger(__name__)

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


def training_papers(papers, train_dois: set[str], eval_dois: set[str]) -> list[dict]:
    """The papers of the training split, never one an eval row asks about (held-out papers stay unseen)."""
    return [r for r in papers if r["doi"] in train_dois and r["doi"] not in eval_dois]


def text_rows(dataset, tokenizer, p: TextParams, n_qa: int, max_length: int, seed: int) -> list[dict]:
    """`p.share` of the training rows beside n_qa QA rows: every version of every training paper (the dataset's
    `papers` split), cut into near-equal rows of at most max_length tokens, drawn in a seeded order (the pool
    repeats when it is smaller than the count asked for), each with the loss on all its tokens."""
    if "papers" not in dataset:
        raise ValueError("`train.text.share` > 0 needs the papers' text (a `papers` split of the dataset)")
    eval_dois = set(dataset["eval"]["doi"]) if len(dataset.get("eval") or []) else set()
    pool = []
    for paper in training_papers(dataset["papers"], set(dataset["train"]["doi"]), eval_dois):
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
        max_length=base["max_length"], completion_only_loss=p.completion_only_loss, packing=False,
        pad_token=None, label_names=["labels"], logging_steps=p.logging_steps,
        train_sampling_strategy="sequential" if staged else "group_by_length" if p.group_by_length else "random",
        include_num_input_tokens_seen="non_padding", ddp_find_unused_parameters=False,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="steps" if ckpt else "no", save_steps=p.checkpoint_steps if ckpt else 500,
        save_total_limit=2 if ckpt else None,
        report_to=p.report_to if p.report_to in ("wandb", "mlflow", "tensorboard") else "none",
        dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=False)


LIVE_SKIP = ("runtime", "per_second", "flos", "tokens_seen")  # Trainer's timings and counters: no curves (and each
                                                              # would be one more `dvc exp show` column)


def dvclive_callback(live_dir: Path):
    """transformers' DVCLive callback on a Live that writes `live_dir` only (DVCLive's defaults edit the repo's
    dvc.yaml and save a DVC experiment of their own: dvc.yaml declares these files instead), each value at the
    optimizer step (DVCLive counts log calls), a resumed run's history before its checkpoint included."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepDVCLive(DVCLiveCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            for logs in state.log_history:  # restored from a checkpoint (DVC removed the files of the killed run)
                self.log_at(args, state, control, logs.get("step", 0), logs)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.log_at(args, state, control, state.global_step, logs)

        def log_at(self, args, state, control, step, logs):
            self.live.step = step
            keep = {k: v for k, v in logs.items() if k != "step" and not any(w in k for w in LIVE_SKIP)}
            super().on_log(args, state, control, logs=keep)

    return StepDVCLive(live=Live(str(live_dir), dvcyaml=None, save_dvc_exp=False))


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


def _peak_memory(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_mem_kind": "cuda_allocated"}
    import resource

    return {"peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_mem_kind": "cpu_max_rss"}


def _eval_before_boundary_save():
    """A callback that moves the per-epoch evaluation before the checkpoint of an epoch's last step.

    Trainer saves at the step's end and evaluates at the epoch's end, after it: the evaluation draws from the global
    RNG (each DataLoader iterator takes a seed from it), so the saved RNG state was not the one epoch 2 started
    with, and a run resumed from that checkpoint skips the evaluation and diverges (mid-epoch checkpoints resumed
    exactly). Evaluating first, in the same `_maybe_log_save_evaluate` call, puts the checkpoint after it: the RNG
    state and the log history it saves are those the next epoch starts from. The uninterrupted run draws the same
    numbers in the same order as before.
    """
    from transformers import TrainerCallback

    class EvalBeforeBoundarySave(TrainerCallback):
        evaluated_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if args.eval_strategy == "epoch" and control.should_save and float(state.epoch).is_integer():
                control.should_evaluate = True
                self.evaluated_at = state.global_step
            return control

        def on_epoch_end(self, args, state, control, **kwargs):  # runs after DefaultFlowCallback's
            if self.evaluated_at == state.global_step:
                control.should_evaluate = False  # done just before the checkpoint
            return control

    return EvalBeforeBoundarySave()


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

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """trl's loss with lm_head on the labelled positions only: trl's fused head scores every position off
            Triton devices (prompt and pad too), plus entropy and top-1 for its logs: ~40% of a SmolLM2 CPU step.
            The forward runs through `model` (DDP's hooks stay), logits_to_keep=1; a hook takes the hidden states."""
            if return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch.nn.functional as F

            core = self.accelerator.unwrap_model(model)
            core = core.get_base_model() if hasattr(core, "get_base_model") else core
            seen = []
            hook = core.get_decoder().register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state))
            try:
                model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=1,
                      use_cache=False)
            finally:
                hook.remove()
            labels = inputs["labels"][:, 1:]
            mask = labels != -100
            head = core.get_output_embeddings()  # outside the forward's autocast: in the frozen head's dtype
            logits = head(seen[0][:, :-1][mask].to(head.weight.dtype)).float()
            loss = F.cross_entropy(logits, labels[mask], reduction="sum")
            if num_items_in_batch is None:
                return loss / mask.sum().clamp(min=1)
            # as trl: num_items_in_batch counts every rank's tokens, and DDP averages the gradients over the ranks
            return loss * (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1) \
                / num_items_in_batch

    return CountingSFTTrainer


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
    trainer = _trainer_cls()(model=model, args=sft_config(base, p, str(run_dir), eval_ds is not None),
                             train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                             optimizers=(build_optimizer(model, p), None),
                             callbacks=[_eval_before_boundary_save(), *callbacks])
    # SFTTrainer casts every trainable tensor of a 4-bit model (qlora) to bf16, the embedding copy included, where
    # small AdamW steps vanish: the fp32 masters go back (the optimizer holds the same Parameter objects, no state yet)
    upcast_trainable_(model)
    return trainer


@contextlib.contextmanager
def neftune(trainer, p: TrainParams, pad_id: int):
    """The per-length NEFTune hook on the input embeddings while training (none when the alpha is unset)."""
    if not p.neftune_noise_alpha:
        yield
        return
    emb = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings()
    handle = emb.register_forward_hook(neftune_per_length(p.neftune_noise_alpha, pad_id))
    try:
        yield
    finally:
        handle.remove()


def train(base: dict[str, Any], p: TrainParams, dataset, device: str, checkpoint_root: Path | None = None,
          callbacks: tuple = ()) -> tuple[Any, Any, dict[str, Any], list[dict]]:
    """Core: returns (model, tokenizer, metrics, trainer log history).

    With `checkpoint_root`, checkpoints go to checkpoint_root/<key> every `checkpoint_steps` and a run with the same
    key resumes from the last one (the run dir is removed after success); without it, a temp dir (no resume).
    """
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    from qrb.model import load_tokenizer, token_weighted_ce

    tokenizer, added = prepare_tokenizer(load_tokenizer(base["model"]), p)
    model = build_model(base, p, tokenizer, device)
    counts = count_params(model)
    log.info("%s: %d trainable of %d params (%.2f%%); %d token(s) added", p.method, counts["trainable_params"],
             counts["total_params"], 100 * counts["trainable_params"] / counts["total_params"], added)
    data_sha = data_fingerprint(dataset)
    key = checkpoint_key(base, p, data_sha)
    with contextlib.ExitStack() as stack:
        if checkpoint_root is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qrb-train-")))
        else:
            run_dir = Path(checkpoint_root) / key
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
                               batch_size=p.eval_batch_size, max_length=base["max_length"])
        metrics.update(eval_ce=ce["cross_entropy"], eval_tokens=ce["tokens"])
    metrics["is_main_process"] = is_main
    return model, tokenizer, metrics, trainer.state.log_history
