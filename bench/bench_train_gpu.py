"""GPU throughput of the card's recipe on Llama-3.1-8B's exact shape: tokens/s, MFU and peak memory.

    .venv/bin/python bench/bench_train_gpu.py [--methods lora_plus dora qlora] [--steps 20] [--batch 8] [--seq 512]

A randomly initialised model (no download, no hub) of Llama-3.1-8B's shape (hidden 4096, 32 layers, 32/8 heads,
MLP 14336, vocab 128256 + the added pad token) gets the recipe from params.yaml (`train:`): LoRA r=8 on
q,k,v,o,gate,up,down + the full embedding matrix trainable, AdamW (LoRA+ groups for lora_plus), grad clip, bf16
(qlora: the projections in bitsandbytes nf4 with double quantisation, bf16 compute). Each method runs `--warmup`
untimed steps, then `--steps` timed ones on random token batches of `--batch` x `--seq` (no padding: the tokens/s
are real tokens).

MFU = 6 * N * tokens/s (+ attention, 12 * layers * hidden * seq per token, PaLM's convention) / peak bf16 FLOP/s
(--peak-tflops; 989 = H100/H200 SXM dense). The base is frozen, so the work really done is nearer 4N per token;
the 6N convention keeps numbers comparable with full fine-tuning reports. Sized for < 8 minutes on one H100
(about 1 minute per method, most of it building the 8B model). Needs CUDA: exits at once without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
             tie_word_embeddings=False)


def build_model(method: str):
    """Random 8B-shape model on the GPU in bf16; for qlora the decoder projections are quantised to nf4."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**SHAPE)
    cfg.vocab_size += 1  # the added pad token (the recipe resizes the embeddings)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "qlora":
        quantize_projections_(model, torch.bfloat16)
    model.config.pad_token_id = cfg.vocab_size - 1
    return model


def quantize_projections_(model, compute_dtype) -> None:
    """nf4 + double quantisation of every decoder nn.Linear (what BitsAndBytesConfig(load_in_4bit) loads)."""
    import bitsandbytes as bnb
    import torch

    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="cpu")
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4")
                setattr(parent, name, q.to("cuda"))  # quantises on the way to the GPU
                del child
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()


def run_method(method: str, args) -> dict:
    import torch
    from peft import get_peft_model

    from qrb.params import load_params
    from stages.train import TrainParams
    from stages.train.model import build_optimizer, lora_config

    _, p = load_params("train", TrainParams, (), REPO / "params.yaml")
    p = dataclasses.replace(p, method=method, precision="bf16")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = build_model(method)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(p))
    build_s = time.time() - t0
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    opt = build_optimizer(model, p) or torch.optim.AdamW(
        [t for t in model.parameters() if t.requires_grad], lr=p.learning_rate, weight_decay=p.weight_decay)
    model.train()
    gen = torch.Generator(device="cuda").manual_seed(0)
    vocab = SHAPE["vocab_size"]

    def step() -> float:
        ids = torch.randint(0, vocab, (args.batch, args.seq), device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([t for t in model.parameters() if t.requires_grad], p.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t1 = time.time()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.time() - t1
    tokens = args.steps * args.batch * args.seq
    flops_per_token = 6 * 8.03e9 + 12 * SHAPE["num_hidden_layers"] * SHAPE["hidden_size"] * args.seq
    tps = tokens / dt
    out = {"method": method, "tokens_per_s": round(tps, 1), "step_s": round(dt / args.steps, 3),
           "mfu": round(tps * flops_per_token / (args.peak_tflops * 1e12), 4),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "trainable_params": trainable,
           "build_s": round(build_s, 1), "last_loss": round(loss, 3)}
    model = opt = None  # free the GPU memory before the next method (step() closes over both)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["lora_plus", "dora", "qlora"],
                    choices=["lora", "lora_plus", "dora", "qlora"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu: needs a CUDA GPU (reference: one H100 80GB); none is visible. "
                         "The CPU benchmark is bench/bench_train_padding.py")
    if "qlora" in args.methods:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("bench_train_gpu: method qlora needs bitsandbytes (pip install bitsandbytes), "
                             "or drop it: --methods lora_plus dora") from None
    print(f"{torch.cuda.get_device_name(0)}; batch {args.batch} x seq {args.seq}; {args.steps} timed steps")
    results = []
    for m in args.methods:
        r = run_method(m, args)
        results.append(r)
        print(json.dumps(r), flush=True)
    print("\n| method | tokens/s | step (s) | MFU (6N) | peak memory (GiB) | trainable |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_mem_gib']:.1f} | {r['trainable_params'] / 1e6:.1f}M |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
