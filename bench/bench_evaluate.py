"""Benchmark: evaluate-stage generation, batched (batch 8, left padding) vs one question at a time, tiny Llama.

Run: `python bench/bench_evaluate.py [--questions 16] [--max-new-tokens 48] [--rounds 3] [--threads 1] [--model DIR]`. Builds the tiny Llama
from data/corpus (as `qrb tiny-model` does) unless `--model` names one, wraps it in a LoRA adapter as the stage
does (fine-tuned row), then answers the same golden-style questions greedily through the stage's own path
(`qrb.model.generate_answers`) with batch_size 8 and with batch_size 1, after one warm-up call each, in interleaved rounds (the fastest
round of each counts, so a burst of load from other processes does not decide the ratio). Prints both wall times,
the tokens generated and the ratio (the bar: batch 8 >= 3x faster than one by one).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM = ("You are Quantum Research Bot, an assistant that answers questions about recent research in quantum "
          "science and technology, as published in the journal Quantum. Answer concisely and factually.")


def questions(n: int) -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "data/corpus/quantum-papers.jsonl").read_text().splitlines() if x.strip()]
    stems = ("What does the paper \"{t}\" show?", "Which method does the paper \"{t}\" use?",
             "What is new in the paper \"{t}\"?")
    return [stems[i % 3].format(t=rows[i % len(rows)]["title"]) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0 = torch's choice; on a busy 2-core machine 2 threads ran every "
                         "op ~20x slower than 1, drowning the comparison in scheduling noise)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--model", help="a tiny Llama folder (default: build one from data/corpus)")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from qrb.model import generate_answers, load_causal_lm, load_tokenizer, resize_for_tokenizer
    from standins import tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_model.build(ROOT / "data/corpus", Path(tmp) / "tiny")
        tok = load_tokenizer(str(model_dir))
        tok.add_special_tokens({"pad_token": "<|pad|>"})
        base = load_causal_lm(str(model_dir))
        resize_for_tokenizer(base, tok)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        model.eval()
        qs = questions(args.questions)

        for bs in (1, 8):  # warm-up
            generate_answers(model, tok, qs[:bs], SYSTEM, batch_size=bs, max_new_tokens=4, desc="warm-up")

        def run(batch_size: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            answers = generate_answers(model, tok, qs, SYSTEM, batch_size=batch_size,
                                       max_new_tokens=args.max_new_tokens, desc=f"batch {batch_size}")
            wall = time.perf_counter() - t0
            return wall, sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)

        times: dict[int, list[float]] = {1: [], 8: []}
        tokens: dict[int, int] = {}
        for r in range(args.rounds):
            for bs in (1, 8):
                wall, tokens[bs] = run(bs)
                times[bs].append(wall)
                print(f"round {r + 1}: batch {bs}: {wall:.2f} s", flush=True)
        (one_s, one_tok), (batch_s, batch_tok) = (min(times[1]), tokens[1]), (min(times[8]), tokens[8])
    print(f"questions: {len(qs)}, max_new_tokens: {args.max_new_tokens}, torch threads: {torch.get_num_threads()}, "
          f"fastest of {args.rounds} rounds")
    print(f"one by one (batch 1): {one_s:7.2f} s  ({one_tok} answer tokens, {len(qs) / one_s:6.2f} questions/s)")
    print(f"batched   (batch 8): {batch_s:7.2f} s  ({batch_tok} answer tokens, {len(qs) / batch_s:6.2f} questions/s)")
    print(f"speed-up: {one_s / batch_s:.2f}x (bar: >= 3x)")


if __name__ == "__main__":
    main()
