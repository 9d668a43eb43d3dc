"""What the stage adds to trl and transformers, none of it reading params: the SFTTrainer that counts real and padded
tokens and runs lm_head on the labelled positions only, per-length NEFTune, evaluation before an epoch-boundary
checkpoint, DVCLive by optimizer step, fp32 masters of the trainable tensors, and two CPU speedups (fp32 attention
under bf16 autocast, dropout masks from random words)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def peak_memory(device: str) -> dict[str, Any]:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1), "peak_mem_kind": "cuda_allocated"}
    import resource

    return {"peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_mem_kind": "cpu_max_rss"}


def eval_before_boundary_save():
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


def counting_trainer_cls():
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
            with core.get_decoder().register_forward_hook(lambda m, a, out: seen.append(out.last_hidden_state)):
                model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), logits_to_keep=1,
                      use_cache=False)
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


def upcast_trainable_(model) -> None:
    """Every trainable tensor in fp32, the frozen base in its load dtype (bf16 autocast computes in bf16).

    peft keeps LoRA A/B in fp32 but makes the `modules_to_save` copy of the embedding (96% of the trainable
    parameters on 8B) in the base's bf16, where AdamW's small steps vanish: a decay step of lr * wd * w = 1e-6 * w is
    under half a bf16 ulp, so weight decay and the late cosine steps would never be applied. fp16 training needs fp32
    parameters too (its grad scaler refuses to unscale fp16 gradients).
    """
    import torch

    for t in model.parameters():
        if t.requires_grad and t.dtype != torch.float32:
            t.data = t.data.float()


def fp32_attention(model) -> None:
    """Attention in fp32 under bf16 autocast on a CPU: torch's CPU flash-attention backward takes ~2x longer in bf16
    than in fp32 without AMX (48 vs 21 ms a SmolLM2 layer at batch 8 x 118); the projections stay bf16."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_fp32(module, query, key, value, attention_mask, **kwargs):
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                  **kwargs)
        return out.to(query.dtype), weights

    AttentionInterface.register("sdpa_fp32", sdpa_fp32)
    AttentionMaskInterface.register("sdpa_fp32", sdpa_mask)
    model.set_attn_implementation("sdpa_fp32")


def word_dropout_(model) -> None:
    """The model's dropouts (LoRA's) with masks cut from 64-bit random words, two elements a word: torch's CPU
    bernoulli_ draws one number an element on one thread (3.4 vs 2.0 ms fwd+bwd at SmolLM2's 8 x 87 x 576). Drop
    probability p to 1e-9, the same 1/(1-p) scaling, the same global RNG (seeded, saved in checkpoints)."""
    import torch

    class WordDropout(torch.nn.Dropout):
        def forward(self, x):
            if not self.training or self.p == 0:
                return x
            words = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 1) // 2,), dtype=torch.int64, device=x.device)
            keep = words.view(torch.int32)[:x.numel()].view(x.shape) >= round(self.p * 2**32) - 2**31
            return x * keep.to(x.dtype).mul_(1 / (1 - self.p))

    for m in model.modules():
        if type(m) is torch.nn.Dropout:
            m.__class__ = WordDropout
