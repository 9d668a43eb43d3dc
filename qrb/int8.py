"""The int8 export format: a merged model with every Linear layer and the embeddings stored as int8 with one scale
per output channel (row), and the loader that serves it (`qrb ask/serve --model artifacts/export/int8`).

`quantize_int8(model)` swaps the modules in place; `save_int8` writes a transformers-style folder plus
`qrb_quantization.json` (method, compute dtype, which modules); `load_exported` loads that folder, or any plain
transformers model folder (the merged export), dequantizing on the fly layer by layer so weights stay int8 in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qrb.errors import QrbError

QUANT_FILE = "qrb_quantization.json"
QUANT_METHOD = "int8-weight-only-per-channel"


def _quantize_rows(w) -> tuple[Any, Any]:
    """Symmetric int8 with one fp32 scale per row (output channel): w ~= q * scale[:, None]."""
    import torch

    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Int8Linear(nn.Module):
        """A Linear layer whose weight is int8 + per-output-channel scales; dequantized per call."""

        def __init__(self, in_features: int, out_features: int, bias: bool, device=None, dtype=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

        @classmethod
        def from_float(cls, lin: nn.Linear) -> Int8Linear:
            m = cls(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
            q, s = _quantize_rows(lin.weight)
            m.weight_int8, m.weight_scale = q, s
            if lin.bias is not None:
                m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
            return m

        def forward(self, x):
            w = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, w, self.bias)

    class Int8Embedding(nn.Module):
        """An Embedding whose rows are int8 + one scale per row; only the looked-up rows are dequantized."""

        def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, device=None,
                     dtype=torch.float32):
            super().__init__()
            self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
            self.out_dtype = dtype
            self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8,
                                                            device=device))
            self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=torch.float32, device=device))

        @classmethod
        def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
            m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta", dtype=emb.weight.dtype)
            m.weight_int8, m.weight_scale = _quantize_rows(emb.weight)
            return m

        def forward(self, ids):
            return (self.weight_int8[ids].float() * self.weight_scale[ids].unsqueeze(-1)).to(self.out_dtype)

    return Int8Linear, Int8Embedding


def _set_module(model, name: str, module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_int8(model) -> dict[str, str]:
    """Replace, in place, every nn.Linear and nn.Embedding by its int8 form; returns {module name: kind}.

    A matrix that input embeddings and lm_head share (a tied model) is quantized into both modules: two int8 copies
    are half the size of the one fp32 matrix, and each module keeps its own buffers, so the config is marked untied
    (a tied config would make a loader try to tie lm_head to the embedding again; shared tensors cannot be saved).
    """
    from torch import nn

    Int8Linear, Int8Embedding = _int8_modules()
    model.config.tie_word_embeddings = False
    done: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            _set_module(model, name, Int8Linear.from_float(module))
            done[name] = "linear"
        elif isinstance(module, nn.Embedding):
            _set_module(model, name, Int8Embedding.from_float(module))
            done[name] = "embedding"
    return done


def save_int8(model, tokenizer, modules: dict[str, str], dtype_name: str, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "qrb": QUANT_METHOD})
    (out / QUANT_FILE).write_text(json.dumps({"method": QUANT_METHOD, "compute_dtype": dtype_name,
                                              "modules": modules}, indent=2, sort_keys=True) + "\n")


def load_exported(path: str | Path, dtype=None):
    """(model, tokenizer) from artifacts/export/merged or artifacts/export/int8 (or any transformers model folder)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    quant = path / QUANT_FILE
    if not quant.exists():
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer
    meta = json.loads(quant.read_text())
    if meta.get("method") != QUANT_METHOD:
        raise QrbError(f"{path}: unknown quantization {meta.get('method')!r}")
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    dtype = dtype or getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(meta["compute_dtype"], "float32"))
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():  # parameters on meta (no random init of a big model), buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    Int8Linear, Int8Embedding = _int8_modules()
    for name, kind in meta["modules"].items():
        old = model.get_submodule(name)
        if kind == "linear":
            new = Int8Linear(old.in_features, old.out_features, old.bias is not None, device="meta", dtype=dtype)
        else:
            new = Int8Embedding(old.num_embeddings, old.embedding_dim, old.padding_idx, device="meta", dtype=dtype)
        _set_module(model, name, new)
    state = load_file(str(path / "model.safetensors"))
    state = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v)
             for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise QrbError(f"{path}: the int8 weights do not fit the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    from transformers import GenerationConfig

    if (path / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model, tokenizer
