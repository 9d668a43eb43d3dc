"""What gets trained: the tokenizer with its added pad token, the adapter configs (LoRA family, LoReFT), the base
model wrapped with the adapter, and the LoRA+ optimizer (see `stages.train` for the recipe)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from qrb.errors import ConfigError

from . import TrainParams

log = logging.getLogger(__name__)


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
        fp32_attention(model)
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
    upcast_trainable_(model)
    if device == "cpu":
        word_dropout_(model)
    if device == "cuda" and p.method != "qlora":
        model = model.to("cuda")
    torch.manual_seed(base["seed"])
    return model


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


def build_optimizer(model, p: TrainParams):
    """LoRA+: B matrices at loraplus_lr_ratio x lr; peft takes weight decay from loraplus_weight_decay."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    if p.method != "lora_plus":
        return None  # Trainer builds AdamW with args.weight_decay
    # fused: the same AdamW in one kernel per tensor; the embedding copy's dense step takes 24 ms instead of 400 on a CPU
    return create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=p.learning_rate, fused=True,
                                     loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay)


def count_params(model) -> dict[str, int]:
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    total = sum(t.numel() for t in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
