"""LoReFT, written natively (pyreft pins transformers 4.45 and is NOT used): low-rank linear subspace representation
fine-tuning (Wu et al. 2024, "ReFT").

On chosen decoder layers, the hidden state h leaving the layer is edited at chosen positions:

    h' = h + R^T (W h + b - R h)

with R (rank x hidden) constrained to orthonormal rows (Q of a thin QR of a free parameter) and W, b a learned
linear projection. The base model is frozen; only R, W, b train (~2 * rank * hidden per layer).

Positions: "all" (every real token), or "f<n>+l<n>" (the first n and the last n tokens of the prompt, as in the
paper). The prompt's end is found from the token ids of the chat template's assistant header, so no extra inputs
are needed at train, eval or generation time; decode steps after the prompt (KV cache) are not intervened on,
exactly as in pyreft's generation. An adapter is saved as loreft_config.json + loreft_weights.safetensors (nothing
of the base); `disabled(model)` (also `model.disable_adapter()`, PeftModel's name) gives the base model's behaviour.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "loreft_config.json"
WEIGHTS_NAME = "loreft_weights.safetensors"
_POSITIONS = re.compile(r"^(all|f(\d+)\+l(\d+))$")


@dataclass
class LoreftConfig:
    hidden_size: int
    layers: list[int]
    rank: int = 4
    positions: str = "f7+l7"
    dropout: float = 0.0
    header_ids: list[int] = field(default_factory=list)  # assistant header token ids: the prompt ends after them
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if not _POSITIONS.match(self.positions):
            raise ValueError(f"loreft: positions must be 'all' or 'f<n>+l<n>', got {self.positions!r}")
        if self.positions != "all" and not self.header_ids:
            raise ValueError("loreft: positions f<n>+l<n> need the chat template's assistant header ids")
        if not 1 <= self.rank <= self.hidden_size:
            raise ValueError(f"loreft: rank must be in [1, hidden_size={self.hidden_size}], got {self.rank}")


class LoreftIntervention(nn.Module):
    """h + R^T(Wh + b - Rh); R's rows orthonormal.

    R = the Q factor of a free (rank x hidden) parameter's thin QR: O(hidden * rank^2), differentiable, and
    immune to weight decay (scaling the free parameter leaves Q as is). torch's orthogonal(householder)
    parametrization is not: it multiplies by int(diagonal), which weight decay turns to 0 after one step.
    """

    def __init__(self, hidden: int, rank: int, dropout: float) -> None:
        super().__init__()
        self.rotate_raw = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, hidden)))
        self.source = nn.Linear(hidden, rank)  # W, b
        self.dropout = nn.Dropout(dropout)

    @property
    def rotation(self) -> torch.Tensor:
        q, r = torch.linalg.qr(self.rotate_raw.T, mode="reduced")  # (hidden, rank)
        return (q * torch.sign(torch.diagonal(r)).unsqueeze(0)).T  # unique: positive diagonal of r

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = self.rotation  # (rank, hidden), orthonormal rows
        hf = h.to(r.dtype)
        edit = self.source(hf) - hf @ r.T  # (.., rank): Wh + b - Rh
        return (hf + self.dropout(edit @ r)).to(h.dtype)


def decoder_layers(model) -> Sequence[Any]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("loreft: the model has no `.model.layers` (a decoder-only transformer is expected)")
    return layers


def resolve_layers(spec: Sequence[int], n_layers: int) -> list[int]:
    """Layer indices of a model with `n_layers` decoder layers, from a depth-independent spec.

    A negative index counts from the end (-1 = the last layer); one that reaches before the first layer is left out,
    so [-8, ..., -1] means "the last 8, or all of them on a shallower model". A non-negative index past the last
    layer is an error, and so is a spec that leaves no layer. [] = every layer.
    """
    if not spec:
        return list(range(n_layers))
    out: set[int] = set()
    for i in spec:
        if i >= n_layers:
            raise ValueError(f"loreft: layer {i} out of range (the model has {n_layers})")
        if i >= -n_layers:  # further back than the first layer: not in this model
            out.add(i % n_layers)
    if not out:
        raise ValueError(f"loreft: no layer of {list(spec)} exists in a model with {n_layers} layers")
    return sorted(out)


def header_ids_for(tokenizer) -> list[int]:
    """Token ids the chat template adds for the assistant turn (the end of every prompt)."""
    msgs = [{"role": "user", "content": "x"}]
    with_gen = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    without = tokenizer.apply_chat_template(msgs, tokenize=False)
    if not with_gen.startswith(without) or with_gen == without:
        raise ValueError("loreft: cannot find the chat template's assistant header")
    ids = tokenizer(with_gen[len(without):], add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("loreft: the assistant header tokenizes to nothing")
    return list(ids)


def position_mask(input_ids, attention_mask, cfg: LoreftConfig):
    """(batch, seq) bool mask of the positions to intervene on."""
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    if cfg.pad_token_id is not None:
        real = real & (input_ids != cfg.pad_token_id)
    if cfg.positions == "all":
        return real
    m = _POSITIONS.match(cfg.positions)
    first, last = int(m.group(2)), int(m.group(3))
    hdr = torch.tensor(cfg.header_ids, device=input_ids.device)
    k = len(cfg.header_ids)
    mask = torch.zeros_like(real)
    if input_ids.shape[1] < k:
        return mask  # a decode step with the KV cache: after the prompt, nothing to edit
    windows = input_ids.unfold(1, k, 1)  # (batch, seq-k+1, k)
    hits = (windows == hdr).all(-1)
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    for b in range(input_ids.shape[0]):
        found = hits[b].nonzero()
        if len(found) == 0:
            continue
        end = int(found[-1]) + k  # prompt = [start, end): through the assistant header
        start = int(real[b].nonzero()[0]) if real[b].any() else 0  # left padding at generation time
        n = end - start
        f, l_ = min(first, n), min(last, n)
        mask[b] = ((idx >= start) & (idx < start + f)) | ((idx >= end - l_) & (idx < end))
    return mask & real


def attach(model, cfg: LoreftConfig):
    """Freeze the base, add the interventions as `model.loreft` and hook them in. Returns the model."""
    layers = decoder_layers(model)
    for i in cfg.layers:
        if not 0 <= i < len(layers):
            raise ValueError(f"loreft: layer {i} out of range (the model has {len(layers)})")
    model.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    ivs = nn.ModuleDict({str(i): LoreftIntervention(cfg.hidden_size, cfg.rank, cfg.dropout) for i in cfg.layers})
    model.loreft = ivs.to(device=device, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    model.loreft_config = cfg
    model._loreft_state = {"mask": None, "enabled": True}

    def pre_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)  # None: inputs_embeds only, positions unknown
        model._loreft_state["mask"] = None if ids is None else position_mask(ids, kwargs.get("attention_mask"), cfg)

    def layer_hook(iv):
        def hook(module, args, output):
            st = model._loreft_state
            if not st["enabled"] or st["mask"] is None:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            mask = st["mask"]
            if mask.shape != hidden.shape[:2] or not bool(mask.any()):
                return output
            edited = torch.where(mask.unsqueeze(-1), iv(hidden), hidden)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited
        return hook

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    for i in cfg.layers:
        layers[i].register_forward_hook(layer_hook(model.loreft[str(i)]))
    model.disable_adapter = lambda: disabled(model)  # PeftModel's name: evaluate's base-model comparison works as is
    return model


def save(model, directory: str | Path) -> None:
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.loreft.state_dict().items()}
    save_file(weights, str(d / WEIGHTS_NAME))
    (d / CONFIG_NAME).write_text(json.dumps({"method": "loreft", **asdict(model.loreft_config)}, indent=2) + "\n")


def load(model, directory: str | Path):
    """Attach the interventions saved in `directory` to a (resized) base model."""
    from safetensors.torch import load_file

    d = Path(directory)
    raw = json.loads((d / CONFIG_NAME).read_text())
    raw.pop("method", None)
    attach(model, LoreftConfig(**raw))
    model.loreft.load_state_dict(load_file(str(d / WEIGHTS_NAME)))
    return model


@contextlib.contextmanager
def disabled(model) -> Iterator[None]:
    """The base model's behaviour (interventions off), like PeftModel.disable_adapter()."""
    st = model._loreft_state
    old, st["enabled"] = st["enabled"], False
    try:
        yield
    finally:
        st["enabled"] = old
