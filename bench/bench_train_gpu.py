"""Throughput of the train stage's own path on Llama-3.1-8B's exact shape: tokens/s, MFU and peak memory.

    .venv/bin/python bench/bench_train_gpu.py [--methods lora_plus dora qlora] [--steps 20] [--batch 8] [--seq 512]
    .venv/bin/python bench/bench_train_gpu.py --smoke     # CPU, a tiny shape: the same path end to end, in seconds

What is timed is the stage's code, not a loop of its own: `stages.train.trainer.train` with the recipe of
params.yaml (`train:`; the method, batch size and length from the flags, one epoch, no checkpoints, no energy
meter). That is `build_model` (the base loaded in bf16, or in nf4 with double quantisation through
BitsAndBytesConfig and peft's k-bit preparation for qlora; the added pad token and the resize; LoRA r=8 on
q,k,v,o,gate,up,down plus the full embedding copy; every trainable tensor an fp32 master), the stage's SFTTrainer
(bf16 autocast, its LoRA+ optimizer, per-length NEFTune, gradient checkpointing as `train.gradient_checkpointing`
says, right padding in length-grouped batches, loss on the answers only).

The base is a randomly initialised model of Llama-3.1-8B's shape (hidden 4096, 32 layers, 32/8 heads, MLP 14336,
vocab 128256; no download), saved once to --model-dir (~16 GB in bf16; a later run with the same folder reuses it)
with a word-level tokenizer of the same vocabulary size and Llama-3's chat template. One token per word, so the
synthetic QA rows have known lengths: uniform between --seq/2 and --seq tokens, as real pairs vary. Steps are
timed after --warmup untimed ones, on the tokens the stage counts (non-padding ones).

MFU = (6 * N + 12 * layers * hidden * mean sequence length) * tokens/s / peak bf16 FLOP/s (--peak-tflops; 989 =
H100/H200 SXM dense), N = the base's parameters (PaLM's convention). The base is frozen, so the work really done is
nearer 4N per token; 6N keeps numbers comparable with full fine-tuning reports. Needs CUDA (exits at once without
it) unless --smoke: then a 2-layer shape in fp32 on the CPU, no MFU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
             tie_word_embeddings=False)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
ROLES = ("system", "user", "assistant")
SYSTEM_WORDS, QUESTION_WORDS = 6, 10
TEMPLATE_TOKENS = 13  # bos + 3 headers of 3 tokens + 3 end-of-turn tokens (Llama-3's layout, one token a word)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` ids: Llama-3's special tokens, the role names, w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from standins.tiny_model import BOS, CHAT_TEMPLATE, EOS, EOT, HEADER_END, HEADER_START, SPECIAL_TOKENS

    fixed = [*SPECIAL_TOKENS, "[UNK]", *ROLES]
    vocab = {t: i for i, t in enumerate(fixed)}
    vocab.update({f"w{i}": len(fixed) + i for i in range(vocab_size - len(fixed))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT, unk_token="[UNK]",
                                   additional_special_tokens=[EOS, HEADER_START, HEADER_END])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_base(model_dir: Path, shape: dict, device: str) -> Path:
    """A random-weight model of `shape` + its tokenizer in `model_dir` (reused when it holds this very shape)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    marker = model_dir / "bench_shape.json"
    if marker.exists() and json.loads(marker.read_text()) == shape:
        print(f"reusing the random base in {model_dir}", flush=True)
        return model_dir
    t0 = time.time()
    tokenizer = word_tokenizer(shape["vocab_size"])
    cfg = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    marker.write_text(json.dumps(shape))
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"random base of {shape['num_hidden_layers']} layers x {shape['hidden_size']} written to {model_dir} "
          f"in {time.time() - t0:.0f} s", flush=True)
    return model_dir


def qa_rows(n: int, seq: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """Rows of random words whose conversations are uniform in [seq/2, seq] tokens."""
    rng = random.Random(seed)
    n_words = vocab_size - 9  # w0 .. w{n-1}

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))

    fixed = TEMPLATE_TOKENS + SYSTEM_WORDS + QUESTION_WORDS
    lo, hi = max(1, seq // 2 - fixed), max(1, seq - fixed)
    return [{"question": words(QUESTION_WORDS), "answer": words(rng.randint(lo, hi))} for _ in range(n)]


def step_timer(warmup: int, device: str):
    """Marks (time, non-padding tokens seen) after step `warmup` and after the last step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.marks: dict[str, tuple[float, int]] = {}

        def on_step_end(self, args, state, control, **kwargs):
            for name, step in (("start", warmup), ("end", state.max_steps)):
                if state.global_step == step:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    self.marks[name] = (time.perf_counter(), int(state.num_input_tokens_seen))

    return StepTimer()


def base_params(shape: dict) -> int:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**shape)).num_parameters()


def run_method(method: str, args, model_dir: Path, shape: dict, device: str) -> dict:
    import torch
    from datasets import Dataset, DatasetDict

    from qrb.params import load_params
    from stages.train import TrainParams
    from stages.train.trainer import train

    _, p = load_params("train", TrainParams, (), REPO / "params.yaml")
    p = dataclasses.replace(p, method=method, precision="bf16" if device == "cuda" else "fp32",
                            batch_size=args.batch, grad_accum=1, epochs=1.0, checkpoint_steps=0,
                            emissions_country=None, logging_steps=10**6)
    p.check()
    system = " ".join(f"w{i}" for i in range(SYSTEM_WORDS))
    base = {"seed": 0, "model": str(model_dir), "system_prompt": system, "hf_offline": True, "max_length": args.seq}
    rows = qa_rows(args.batch * (args.warmup + args.steps), args.seq, shape["vocab_size"])
    timer = step_timer(args.warmup, device)
    if device == "cuda":
        torch.cuda.empty_cache()
    t0 = time.time()
    model, _, metrics, _ = train(base, p, DatasetDict(train=Dataset.from_list(rows)), device, callbacks=(timer,))
    setup_s = time.time() - t0 - metrics["wall_s"]
    (t1, tok1), (t2, tok2) = timer.marks["start"], timer.marks["end"]
    steps = metrics["steps"] - args.warmup
    tps = (tok2 - tok1) / (t2 - t1)
    mean_len = (tok2 - tok1) / (steps * args.batch)
    out = {"method": method, "device": device, "tokens_per_s": round(tps, 1), "step_s": round((t2 - t1) / steps, 3),
           "timed_steps": steps, "mean_seq_tokens": round(mean_len, 1),
           "padding_fraction": metrics["padding_fraction"], "peak_mem_gib": round(metrics["peak_mem_mb"] / 1024, 2),
           "peak_mem_kind": metrics["peak_mem_kind"], "trainable_params": metrics["trainable_params"],
           "setup_s": round(setup_s, 1), "train_loss": round(metrics["train_loss"], 3),
           "gradient_checkpointing": p.gradient_checkpointing, "neftune_noise_alpha": p.neftune_noise_alpha,
           "group_by_length": p.group_by_length, "precision": p.precision}
    if device == "cuda":
        n = base_params(shape)
        flops_per_token = 6 * n + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_len
        out["mfu"] = round(tps * flops_per_token / (args.peak_tflops * 1e12), 4)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", choices=["lora", "lora_plus", "dora", "qlora", "loreft"],
                    help="default: lora_plus dora qlora (--smoke: lora_plus dora)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512, help="longest conversation in tokens (base.max_length)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s of the GPU")
    ap.add_argument("--model-dir", help="where the random base is written (and reused); default a temp folder")
    ap.add_argument("--smoke", action="store_true", help="CPU, a 2-layer shape, 2 timed steps: checks the script")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("bench_train_gpu: --warmup and --steps must be >= 1")
    import torch

    from qrb.io import setup_logging

    setup_logging()
    if args.smoke:
        device, shape = "cpu", SMOKE_SHAPE
        args.steps, args.warmup, args.batch, args.seq = 2, 1, 4, 64
        methods = args.methods or ["lora_plus", "dora"]
        if "qlora" in methods:
            raise SystemExit("bench_train_gpu: --smoke runs on the CPU, where qlora (nf4) cannot")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_train_gpu: needs a CUDA GPU (reference: one H100 80GB); none is visible. "
                             "`--smoke` checks the script on the CPU; the CPU benchmark is bench/bench_train_padding.py")
        device, shape = "cuda", SHAPE
        methods = args.methods or ["lora_plus", "dora", "qlora"]
        if "qlora" in methods:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise SystemExit("bench_train_gpu: method qlora needs bitsandbytes (pip install bitsandbytes), "
                                 "or drop it: --methods lora_plus dora") from None
        print(f"{torch.cuda.get_device_name(0)}; batch {args.batch} x <= {args.seq} tokens; {args.steps} timed steps")
    with tempfile.TemporaryDirectory(prefix="qrb-bench-base-") as tmp:
        model_dir = build_base(Path(args.model_dir or tmp), shape, device)
        results = []
        for m in methods:
            r = run_method(m, args, model_dir, shape, device)
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| method | tokens/s | step (s) | MFU (6N) | peak memory (GiB) | padding | trainable |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "n/a"
        print(f"| {r['method']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {mfu} | {r['peak_mem_gib']:.1f} | "
              f"{100 * r['padding_fraction']:.1f}% | {r['trainable_params'] / 1e6:.1f}M |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
