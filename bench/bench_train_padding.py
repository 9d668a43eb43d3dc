"""Padding waste of training batches: length-grouped (train.group_by_length, the default) vs naive right padding.

    .venv/bin/python bench/bench_train_padding.py [--workspace demo] [--data F.jsonl] [--tokenizer DIR]

Tokenizes the validated QA pairs exactly as training does (system prompt + question + answer through the chat
template, qrb.model.encode_pair) and lays them into batches of train.batch_size the two ways transformers' Trainer
would: RandomSampler (naive) and LengthGroupedSampler (train_sampling_strategy="group_by_length"). Waste = padded
tokens / all tokens in the batches. Reported for the data as is and bootstrapped to the card's ~5k pairs (the
sampler's mega-batches are 50 batches, so data size matters). CPU only, a few seconds. Target: waste <= 5%.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def waste(lengths: list[int], order: list[int], batch_size: int) -> float:
    real = padded = 0
    for i in range(0, len(order), batch_size):
        chunk = [lengths[j] for j in order[i:i + batch_size]]
        real += sum(chunk)
        padded += max(chunk) * len(chunk)
    return 1 - real / padded


def orders(lengths: list[int], batch_size: int, seed: int) -> dict[str, list[int]]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    g = torch.Generator().manual_seed(seed)
    naive = torch.randperm(len(lengths), generator=g).tolist()
    grouped = list(LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    return {"naive right padding": naive, "length-grouped": grouped}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "demo"), help="a demo workspace (after `qrb demo`)")
    ap.add_argument("--data", help="QA pairs (jsonl with question/answer); default <workspace>/artifacts/validate/"
                                   "train.jsonl")
    ap.add_argument("--tokenizer", help="default the workspace's base.model (models/tiny-llama, or smol's)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, help="default the workspace's base.max_length")
    ap.add_argument("--bootstrap", type=int, default=5000, help="also resample the lengths to this many pairs")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    ws = Path(args.workspace)
    from qrb.model import encode_pair, load_tokenizer
    from qrb.params import read_yaml

    params = read_yaml(ws / "params.yaml") if (ws / "params.yaml").exists() else read_yaml(REPO / "params.yaml")
    system = params["base"]["system_prompt"]
    args.max_length = args.max_length or int(params["base"].get("max_length", 1024))
    data = Path(args.data or ws / "artifacts/validate/train.jsonl")
    tok_dir = Path(args.tokenizer or ws / params["base"]["model"])
    if not data.exists() or not tok_dir.exists():
        raise SystemExit(f"bench_train_padding: need {data} and {tok_dir}: run `qrb demo --workspace {ws}` first "
                         "or pass --data and --tokenizer")
    tok = load_tokenizer(str(tok_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    t0 = time.time()
    lengths = [len(encode_pair(tok, system, r["question"], r["answer"], args.max_length)[0]) for r in rows]
    print(f"{len(rows)} QA pairs from {data} ({time.time() - t0:.1f} s to tokenize with {tok_dir.name}); "
          f"tokens per pair: min {min(lengths)}, median {statistics.median(lengths):.0f}, max {max(lengths)}; "
          f"batch size {args.batch_size}")
    sets = {f"as is (n={len(lengths)})": lengths}
    if args.bootstrap:
        rng = random.Random(0)
        sets[f"bootstrapped (n={args.bootstrap})"] = [rng.choice(lengths) for _ in range(args.bootstrap)]
    print("\n| data | naive right padding | length-grouped | ratio |\n|---|---|---|---|")
    results = {}
    for name, ls in sets.items():
        w: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            for kind, order in orders(ls, args.batch_size, seed).items():
                w.setdefault(kind, []).append(waste(ls, order, args.batch_size))
        naive, grouped = statistics.mean(w["naive right padding"]), statistics.mean(w["length-grouped"])
        results[name] = {"naive": naive, "grouped": grouped}
        print(f"| {name} | {100 * naive:.1f}% | {100 * grouped:.1f}% | {naive / max(grouped, 1e-9):.1f}x less |")
    worst = max(r["grouped"] for r in results.values())
    print(f"\nlength-grouped waste {'<=' if worst <= 0.05 else '>'} 5% target (worst {100 * worst:.2f}%)")


if __name__ == "__main__":
    main()
