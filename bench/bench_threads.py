"""How many torch threads per process: training and generation speed on SmolLM2-135M at fixed thread counts and
at the stages' own choice (`qrb.stage.cpu_threads()`), quiet and beside busy processes, in ONE run.

    .venv/bin/python bench/bench_threads.py [--threads 1 2] [--repeats 5] [--busy 2] [--steps 4] [--out FILE]

Each measurement is a fresh process (torch's thread pool is fixed once started): `--steps` optimizer steps of the
train stage's own `train()` on the smol profile's recipe, then greedy generation of 32 tokens for 8 questions in one
batch, as evaluate does. Per repeat, both conditions run (quiet: nothing started by this script; busy: `--busy`
busy-looping processes beside it), and within each condition the settings (each of `--threads`, then "auto", the
policy) run in an order rotated every repeat, so slow drift of the machine falls on every setting alike. Each row
records the 1-minute load average and `qrb.stage.busy_cores()` at its start (what else ran). Prints the median
tokens/s per condition and setting, and its ratio to 1 thread in the same condition; the raw rows go to `--out`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(setting: str, steps: int) -> dict:
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from qrb import stage

    os.environ.pop(stage.THREADS_ENV, None)
    state = {"load_1min": os.getloadavg()[0], "busy_cores": round(stage.busy_cores(os.cpu_count() or 1), 2)}
    threads = stage.cpu_threads() if setting == "auto" else int(setting)
    import torch

    torch.set_num_threads(threads)

    from datasets import Dataset, DatasetDict
    from transformers.utils import logging as hf_logging

    from helpers import qa_rows, smol_recipe
    from qrb.model import generate_answers
    from stages.train.trainer import train

    hf_logging.set_verbosity_error()
    base, p = smol_recipe(epochs=1.0, checkpoint_steps=0, emissions_country=None, report_to="none")
    rows = qa_rows(REPO / "data" / "corpus")[: steps * p.batch_size]
    model, tok, metrics, _ = train(base, p, DatasetDict(train=Dataset.from_list(rows)), "cpu")
    t0 = time.time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.precision == "bf16_cpu"):  # the base is in bf16 then
        answers = generate_answers(model, tok, [r["question"] for r in rows[:8]], base["system_prompt"], batch_size=8,
                                   max_new_tokens=32)
    new_tokens = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"setting": setting, "threads": threads, **state, "train_tokens_per_s": metrics["tokens_per_s"],
            "generate_tokens_per_s": round(new_tokens / (time.time() - t0), 1)}


def spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", nargs="+", default=["1", "2"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--busy", type=int, default=2, help="busy processes beside the busy condition's measurements")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="bench_threads.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.steps)))
        return
    settings, rows = [*args.threads, "auto"], []
    for rep in range(args.repeats):
        for busy in (0, args.busy):
            hogs = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
            for h in hogs:
                h.start()
            try:
                for setting in settings[rep % len(settings):] + settings[:rep % len(settings)]:
                    out = subprocess.run([sys.executable, __file__, "--child", setting, "--steps", str(args.steps)],
                                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                    rows.append({"repeat": rep, "busy": busy, **json.loads(out)})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                for h in hogs:
                    h.terminate()
            Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")

    def median(busy: int, setting: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["busy"] == busy and r["setting"] == setting)

    print("| condition | setting | train tok/s (median) | vs 1 thread | generate tok/s (median) | vs 1 thread |")
    print("|---|---|---|---|---|---|")
    for busy in (0, args.busy):
        for s in settings:
            t, g = median(busy, s, "train_tokens_per_s"), median(busy, s, "generate_tokens_per_s")
            print(f"| {busy} busy | {s} | {t:.1f} | {t / median(busy, '1', 'train_tokens_per_s'):.2f}x | {g:.1f} | "
                  f"{g / median(busy, '1', 'generate_tokens_per_s'):.2f}x |")


if __name__ == "__main__":
    main()
