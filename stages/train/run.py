"""The train stage's I/O (see `stages.train`): the validated dataset in; the adapter, lineage.json, metrics and
loss plots out, only from rank 0 when several processes train. `main` ties `run` to `qrb.stage.run_stage`."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import atomic_write_text, read_jsonl, write_metrics
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, TrainParams, gate
from .hooks import dvclive_callback
from .lineage import lineage
from .trainer import train

log = logging.getLogger(__name__)

DATASET_DIR = Path("artifacts/validate/dataset")
PAPERS = Path("artifacts/scrape/papers.jsonl")
ADAPTER_DIR = Path("artifacts/train/adapter")
METRICS = Path("metrics/train.json")  # the headline numbers (dvc metrics); the whole record in REPORT
REPORT = Path("reports/train.json")
HEADLINE = ("eval_ce", "train_loss", "tokens_per_s", "trainable_params")
LIVE_DIR = Path("dvclive")  # DVCLive's layout: metrics.json, plots/metrics/<name>.tsv (dvc.yaml's loss plot)
CHECKPOINT_ROOT = Path("cache/train")


def save_adapter(model, tokenizer, p: TrainParams, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if p.method == "loreft":
        from qrb import loreft

        loreft.save(model, out)
    else:  # lm_head is not trained and the pad rows are rebuilt deterministically: don't ship a copy of them
        model.save_pretrained(out, save_embedding_layers=False)
    tokenizer.save_pretrained(out)


def run(base: dict[str, Any], p: TrainParams, args) -> None:
    from qrb.model import require_hardware

    if p.report_to in ("wandb", "mlflow", "tensorboard") and importlib.util.find_spec(p.report_to) is None:
        raise ConfigError(f"`train.report_to: {p.report_to}` is not installed (pip install {p.report_to})")
    device = require_hardware(base["model"], "nf4" if p.method == "qlora" else p.precision)  # bf16_cpu: any device
    if device == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun-style ranks without a GPU: accelerate forms a gloo (MULTI_CPU) group only when told "cpu";
        # `accelerate launch --cpu` itself starts a single process in accelerate 1.15 (no mpirun hostfile)
        os.environ["ACCELERATE_USE_CPU"] = "true"
    if not DATASET_DIR.exists():
        raise ConfigError(f"{DATASET_DIR} not found: run the validate stage first (dvc repro validate)")
    from datasets import Dataset, load_from_disk

    # in memory: .map() would otherwise write cache files into validate's output folder and DVC would see it changed
    dataset = load_from_disk(str(DATASET_DIR), keep_in_memory=True)
    if len(dataset["train"]) == 0:
        raise DataError("the validated training split is empty")
    if p.text.share > 0:  # the papers' text: the core keeps the training split's papers only
        if not PAPERS.exists():
            raise ConfigError(f"{PAPERS} not found (`train.text.share` > 0 trains on the papers' text): run scrape")
        keys = ("doi", "title", "abstract", "full_text")
        dataset["papers"] = Dataset.from_list([{k: r.get(k) or "" for k in keys} for r in read_jsonl(PAPERS)])
    rows = dataset["train"].to_list()
    keep, known, unknown = gate.hold_back(rows, base["seed"]) if p.gate else (range(len(rows)), [], [])
    dataset["train"] = dataset["train"].select(keep)
    CHECKPOINT_ROOT.mkdir(parents=True, exist_ok=True)  # a DVC out (persist: true): must exist after the stage
    live = (dvclive_callback(LIVE_DIR),) if os.environ.get("RANK", "0") == "0" else ()  # rank 0 writes
    model, tokenizer, metrics, _ = train(base, p, dataset, device, checkpoint_root=CHECKPOINT_ROOT, callbacks=live)
    if not metrics.pop("is_main_process"):
        return  # multi-process: only rank 0 writes
    save_adapter(model, tokenizer, p, ADAPTER_DIR)
    if p.gate:
        import torch

        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=p.bf16):  # as the base was trained
            found = gate.calibrate(model, tokenizer, rows, known, unknown, base["system_prompt"], p.eval_batch_size,
                                   ADAPTER_DIR)
        metrics.update({f"gate_{k}": v for k, v in found.items()})
        log.info("confidence gate: min_prob %.3f; held back %d known facts (%d kept right), %d unknown papers' "
                 "questions (%d declined); %d titles known", found["min_prob"], found["known"],
                 found["known_kept_right"], found["unknown"], found["unknown_declined"], found["papers"])
    atomic_write_text(ADAPTER_DIR / "lineage.json", json.dumps(lineage(base, p, metrics), indent=2, default=str) + "\n")
    write_metrics(METRICS, REPORT, metrics, HEADLINE)
    log.info("adapter written to %s; eval CE %s; %.0f tokens/s, padding %.1f%%", ADAPTER_DIR, metrics.get("eval_ce"),
             metrics["tokens_per_s"] or 0, 100 * (metrics["padding_fraction"] or 0))


def main(argv: list[str] | None = None) -> None:
    import stages.train

    run_stage(stages.train.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
