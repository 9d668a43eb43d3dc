"""How many torch threads per process: training and generation speed on SmolLM2-135M at 1 vs N threads.

    .venv/bin/python bench/bench_threads.py [--threads 1 2] [--steps 4] [--busy 0]

Each thread count runs in a fresh process (torch's thread pool is fixed once it has started): `--steps` optimizer
steps of the train stage's own `train()` on the smol profile's recipe (batch 8, max_length, fp32, no gradient
checkpointing), then greedy generation of 32 tokens for 8 questions in one batch, as evaluate does. `--busy N`
starts N busy-looping processes beside it, to stand for other work on a shared machine. Prints tokens/s per setting
and the ratio against the first thread count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(threads: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import dataclasses

    from datasets import Dataset, DatasetDict
    from transformers.utils import logging as hf_logging

    from flows.workspace import profile_params
    from helpers import qa_rows
    from qrb.chat import generate_answers
    from qrb.offline import smol_model
    from qrb.params import build
    from stages.train import TrainParams
    from stages.train.trainer import train

    hf_logging.set_verbosity_error()
    params = profile_params("smol", REPO)
    model_dir = smol_model.build(Path.home() / ".cache" / "qrb-tests" / "smollm2-135m-instruct")
    base = {**{k: params["base"][k] for k in ("seed", "system_prompt", "hf_offline", "max_length")},
            "model": str(model_dir)}
    p = dataclasses.replace(build(TrainParams, params["train"], "train"), epochs=1.0, checkpoint_steps=0,
                            emissions_country=None)
    rows = qa_rows(REPO / "data" / "corpus")[: steps * p.batch_size]
    model, tok, metrics, _ = train(base, p, DatasetDict(train=Dataset.from_list(rows)), "cpu")
    questions = [r["question"] for r in rows[:8]]
    t0 = time.time()
    answers = generate_answers(model, tok, questions, base["system_prompt"], batch_size=8, max_new_tokens=32)
    gen_s = time.time() - t0
    new_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"threads": threads, "train_tokens_per_s": metrics["tokens_per_s"], "train_wall_s": metrics["wall_s"],
            "generate_tokens_per_s": round(new_tokens / gen_s, 1)}


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--busy", type=int, default=0, help="busy processes running beside the measurement")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps)))
        return
    hogs = [mp.Process(target=spin, daemon=True) for _ in range(args.busy)]
    for h in hogs:
        h.start()
    try:
        results = []
        for n in args.threads:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results.append(json.loads(out))
            print(json.dumps(results[-1]), flush=True)
    finally:
        for h in hogs:
            h.terminate()
    ref = results[0]
    for r in results:
        print(f"{r['threads']} thread(s), {args.busy} busy process(es): train {r['train_tokens_per_s']} tok/s "
              f"({r['train_tokens_per_s'] / ref['train_tokens_per_s']:.2f}x), generate "
              f"{r['generate_tokens_per_s']} tok/s ({r['generate_tokens_per_s'] / ref['generate_tokens_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
