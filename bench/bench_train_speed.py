"""Training tokens/s of the train stage before and after its CPU speed work, alternating in one process.

    QRB_CPU_THREADS=2 .venv/bin/python bench/bench_train_speed.py [--steps 6] [--repeats 3] [--arms baseline fp32 bf16]

Every arm runs `stages.train.trainer.train()` (the stage's own path: counting trainer, per-length NEFTune, LoRA+ on
the 7 projections + the embedding copy, batch 8) on SmolLM2-135M-Instruct with the smol profile's recipe, on the
same rows (QA pairs from the corpus's abstract sentences, as tests/helpers.py builds them, or a demo's validated
rows with `--dataset`), `--steps` optimizer steps (batches of the length-grouped rows):
- baseline: the path before the speed work: trl's fused LM head (on a CPU it scores every position, prompt and pad
  included, plus entropy and top-1 for its logs), the per-parameter (unfused) AdamW and torch's dropout, fp32;
- fp32: today's path: lm_head on the answer positions only, fused AdamW, word-cut dropout masks, fp32;
- bf16: today's path under bf16 autocast, fp32 masters (`train.precision: bf16_cpu`: the base loaded in bf16,
  attention in fp32).
Tokens/s = real (non-pad) tokens stepped on / wall seconds of `trainer.train()`, and per CPU-second of this process
(steadier on a shared machine); the arms rotate order each repeat, all with the same torch threads ($QRB_CPU_THREADS,
else 1). The train loss of each arm is printed beside it:
baseline and fp32 compute the same math (their dropout masks are other draws of the same distribution).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def cpu_clock():
    """A callback reading this process's CPU seconds (all threads) over `trainer.train()`: on a machine shared with
    other work, wall time measures the neighbours too, CPU time mostly this process."""
    import time

    from transformers import TrainerCallback

    class CpuClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.process_time()

        def on_train_end(self, *a, **k):
            self.seconds = time.process_time() - self.t0

    return CpuClock()


def run_arm(arm: str, base: dict, p, ds) -> dict:
    from stages.train.trainer import train

    p = dataclasses.replace(p, precision="bf16_cpu" if arm == "bf16" else "fp32")
    clock = cpu_clock()
    from helpers import legacy_train_path

    with legacy_train_path() if arm == "baseline" else contextlib.nullcontext():
        _, _, m, _ = train(base, p, ds, "cpu", callbacks=(clock,))
    real = m["tokens_per_s"] * m["wall_s"]
    return {"tokens_per_s": m["tokens_per_s"], "tokens_per_cpu_s": round(real / clock.seconds, 1),
            "train_loss": round(m["train_loss"], 4), "wall_s": m["wall_s"], "cpu_s": round(clock.seconds, 1),
            "padding_fraction": m["padding_fraction"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm, arms rotating")
    ap.add_argument("--arms", nargs="+", default=["baseline", "fp32", "bf16"], choices=["baseline", "fp32", "bf16"])
    ap.add_argument("--dataset", help="a validated dataset folder (artifacts/validate/dataset of a demo workspace): "
                    "its train rows instead of the corpus's")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    from datasets import Dataset, DatasetDict, load_from_disk
    from transformers.utils import logging as hf_logging

    from helpers import qa_rows, smol_recipe
    threads = int(os.environ.get("QRB_CPU_THREADS", "1"))
    torch.set_num_threads(threads)
    hf_logging.set_verbosity_error()
    base, p = smol_recipe(epochs=1.0, checkpoint_steps=0, emissions_country=None, logging_steps=1000)
    rows = list(load_from_disk(args.dataset)["train"]) if args.dataset else qa_rows(REPO / "data" / "corpus")
    # all the rows, `--steps` batches of them: length grouping sees the whole set, as in a real run
    p = dataclasses.replace(p, epochs=args.steps * p.batch_size / len(rows))
    ds = DatasetDict(train=Dataset.from_list(rows))
    results: dict[str, list[dict]] = {a: [] for a in args.arms}
    for i in range(args.repeats):
        order = args.arms[i % len(args.arms):] + args.arms[:i % len(args.arms)]
        for arm in order:
            r = run_arm(arm, base, p, ds)
            results[arm].append(r)
            print(f"repeat {i + 1} {arm}: {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_cpu_s']:.1f} tokens per "
                  f"CPU-second, train loss {r['train_loss']}", flush=True)
    ref = args.arms[0]
    summary = {"threads": threads, "steps": args.steps, "rows": len(rows), "runs": results}
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        med = {a: statistics.median(r[key] for r in rs) for a, rs in results.items()}
        summary["median_" + key] = med
        summary[f"{key}_ratio_to_{ref}"] = {a: round(v / med[ref], 2) for a, v in med.items()}
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
