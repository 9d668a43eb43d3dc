"""Training throughput of the train stage vs a plain trl `SFTTrainer` script, same model, data and settings.

    .venv/bin/python bench/bench_train_overhead.py [--steps 30] [--repeats 2] [--threads 1] [--profile smol]

Both sides train SmolLM2-135M-Instruct (the smol profile's base, built by `qrb smol-model`) on the same QA pairs
(abstract sentences of the corpus, as tests/helpers.py builds them) with the profile's recipe: LoRA+ r=8 on the 7
projections + the embedding copy, batch 8, fp32, max_length, length-grouped batches, NEFTune alpha 5, `--steps`
optimizer steps. The stage side is `stages.train.trainer.train()` exactly as `dvc repro train` runs it (its
counting trainer, per-length NEFTune hook, checkpoints every `train.checkpoint_steps`, codecarbon meter). The
baseline is the plain recipe in a dozen lines of peft + trl (transformers' own NEFTune, no checkpoints, no meter).
Throughput = non-padding tokens stepped on / wall seconds of `trainer.train()`; the two alternate `--repeats` times
in one process, each with `--threads` torch threads. Prints the medians and the overhead (baseline / stage - 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def rows(n: int) -> list[dict]:
    from helpers import qa_rows

    corpus = REPO / "data" / "corpus"
    out = qa_rows(corpus)
    if not out:
        raise SystemExit(f"no QA pairs from {corpus}: run `dvc pull data.dvc` (or `make data`) first")
    while len(out) < n:
        out += out
    return out[:n]


def stage_run(base: dict, p, ds) -> float:
    from stages.train.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        _, _, metrics, _ = train(base, p, ds, "cpu", checkpoint_root=Path(tmp))
    return metrics["tokens_per_s"]


def plain_run(base: dict, p, ds) -> float:
    """The recipe as a plain peft + trl script would write it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from qrb.model import completion_messages, prompt_messages

    set_seed(base["seed"])
    tok = AutoTokenizer.from_pretrained(base["model"])
    tok.add_special_tokens({"pad_token": p.pad_token})
    model = AutoModelForCausalLM.from_pretrained(base["model"])
    model.resize_token_embeddings(len(tok))
    model = get_peft_model(model, LoraConfig(r=p.lora.r, lora_alpha=p.lora.alpha, lora_dropout=p.lora.dropout,
                                             target_modules=list(p.lora.target_modules),
                                             modules_to_save=list(p.lora.modules_to_save), task_type="CAUSAL_LM"))
    opt = create_loraplus_optimizer(model=model, optimizer_cls=torch.optim.AdamW, lr=p.learning_rate,
                                    loraplus_lr_ratio=p.loraplus_lr_ratio, loraplus_weight_decay=p.weight_decay)
    data = ds["train"].map(lambda r: {"prompt": prompt_messages(base["system_prompt"], r["question"]),
                                      "completion": completion_messages(r["answer"])},
                           remove_columns=ds["train"].column_names)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, per_device_train_batch_size=p.batch_size, num_train_epochs=p.epochs,
                         learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler,
                         max_grad_norm=p.max_grad_norm, neftune_noise_alpha=p.neftune_noise_alpha,
                         max_length=base["max_length"], completion_only_loss=True, activation_checkpointing=False,
                         train_sampling_strategy="group_by_length" if p.group_by_length else "random",
                         include_num_input_tokens_seen="non_padding", save_strategy="no", eval_strategy="no",
                         report_to="none", logging_steps=p.logging_steps, seed=base["seed"], disable_tqdm=True,
                         bf16=p.precision == "bf16", fp16=p.precision == "fp16",
                         dataloader_pin_memory=False)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             optimizers=(opt, None))
        t0 = time.time()
        trainer.train()
        wall = time.time() - t0
    return trainer.state.num_input_tokens_seen / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--profile", default="smol")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    import torch
    from datasets import Dataset, DatasetDict
    from transformers.utils import logging as hf_logging

    from flows.workspace import profile_params
    from qrb.params import build
    from stages.train import TrainParams
    from standins import smol_model

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    params = profile_params(args.profile, REPO)
    model_dir = smol_model.build(Path.home() / ".cache" / "qrb-tests" / "smollm2-135m-instruct")
    base = {**{k: params["base"][k] for k in ("seed", "system_prompt", "hf_offline", "max_length")},
            "model": str(model_dir)}
    p = build(TrainParams, params["train"], "train")
    n = args.steps * p.batch_size
    p = dataclasses.replace(p, epochs=1.0)
    ds = DatasetDict(train=Dataset.from_list(rows(n)))
    results: dict[str, list[float]] = {"stage": [], "plain": []}
    for i in range(args.repeats):
        for name, fn in (("plain", plain_run), ("stage", stage_run)) if i % 2 == 0 else \
                (("stage", stage_run), ("plain", plain_run)):
            tps = fn(base, p, ds)
            results[name].append(tps)
            print(f"run {i + 1} {name}: {tps:.1f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    overhead = med["plain"] / med["stage"] - 1
    summary = {"steps": args.steps, "threads": args.threads, "rows": n, "tokens_per_s": results,
               "median_tokens_per_s": med, "overhead": overhead, "method": p.method,
               "checkpoint_steps": p.checkpoint_steps}
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text, f"stage {med['stage']:.1f} vs plain trl {med['plain']:.1f} tokens/s: overhead {100 * overhead:+.1f}% "
          "(bar: <= 10%)", sep="\n")


if __name__ == "__main__":
    main()
