"""What gets trained: the tokenizer with its added pad token, the adapter configs (LoRA family, LoReFT), the base
model wrapped with the adapter, and the LoRA+ optimizer (see `stages.train` for the recipe)."""

from __future__ import annotations

from typing import Any

from qrb.errors import ConfigError

from . import TrainParams


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


def count_params(model) -> dict[str, int]:
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    total = sum(t.numel() for t in model.parameters())
    return {"trainable_params": trainable, "total_params": total}
