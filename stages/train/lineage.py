"""What an adapter was made from, and what making it cost: fingerprints of the data and the base model, the
checkpoint key built from them, codecarbon's offline energy meter, and the record written as lineage.json."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qrb.params import read_yaml

from . import BASE_KEYS, SECTION, TrainParams

log = logging.getLogger(__name__)

WORKSPACE_MANIFEST = Path(".qrb-workspace.json")  # flows.workspace.MANIFEST: a workspace's project commit


def data_fingerprint(dataset) -> str:
    """sha256 of the train/eval rows (what a checkpoint was trained on)."""
    h = hashlib.sha256()
    for split in sorted(dataset.keys()):
        h.update(split.encode())
        for row in dataset[split]:
            h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """The base model's identity: its config and weight files' names and sizes (a hub id stands for itself)."""
    d = Path(path)
    if not d.is_dir():
        return path
    h = hashlib.sha256()
    for f in sorted(d.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes() if f.suffix == ".json" else str(f.stat().st_size).encode())
    return h.hexdigest()


def model_revision(model: str, offline: bool = True) -> dict[str, Any]:
    """Which exact base weights: a local folder by the md5 DVC tracks it under (its `<folder>.dvc`; train depends on
    it through `models/` in dvc.yaml), a Hub id by the snapshot commit that the local Hugging Face cache holds (what
    from_pretrained loaded), else, when the hub may be asked, the Hub's current commit."""
    folder = Path(model)
    if folder.is_dir():
        tracked = folder.parent / f"{folder.name}.dvc"
        if not tracked.exists():
            return {"source": "local", "dvc_md5": None, "note": f"not tracked by DVC (no {tracked})"}
        outs = read_yaml(tracked).get("outs") or [{}]
        return {"source": "local", "dvc_md5": outs[0].get("md5"), "dvc_file": str(tracked)}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
    except Exception:  # an id the cache cannot hold
        cached = None
    if isinstance(cached, str):  # .../models--org--name/snapshots/<commit>/config.json
        return {"source": "hub", "revision": Path(cached).parent.name, "from": "local Hugging Face cache"}
    if not offline:
        try:
            from huggingface_hub import HfApi

            return {"source": "hub", "revision": HfApi().model_info(model, timeout=10).sha, "from": "the Hub"}
        except Exception as e:  # lineage must never cost a training run
            log.warning("train: the base model's revision is unknown (%s)", e)
    return {"source": "hub", "revision": None}


def checkpoint_key(base: dict[str, Any], p: TrainParams, data_sha: str) -> str:
    """Checkpoints are only resumed by a run with the very same params, data and base model."""
    blob = json.dumps({"base": {k: base[k] for k in BASE_KEYS}, "train": dataclasses.asdict(p), "data": data_sha,
                       "model": model_fingerprint(base["model"])}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def emissions_meter(country: str | None) -> Iterator[dict[str, Any]]:
    """Energy (kWh) and CO2-eq (kg) of the block, from codecarbon's offline tracker (no network: the grid's carbon
    intensity comes from `country`, an ISO 3166 alpha-3 code). Filled in on exit; {} when metering is off."""
    out: dict[str, Any] = {}
    if not country:
        yield out
        return
    try:
        from codecarbon import OfflineEmissionsTracker

        tracker = OfflineEmissionsTracker(country_iso_code=country, save_to_file=False, log_level="error",
                                          tracking_mode="process", measure_power_secs=15)
        tracker.start()
    except Exception as e:  # the meter must never cost a training run; the card then says "not measured"
        log.warning("train: energy not metered (codecarbon: %s)", e)
        yield out
        return
    try:
        yield out
    finally:
        kg = tracker.stop()
        data = tracker.final_emissions_data
        out.update(energy_kwh=float(data.energy_consumed), co2_kg=float(kg or 0.0), country=country,
                   cpu=getattr(data, "cpu_model", None), gpu=getattr(data, "gpu_model", None) or None)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def source() -> dict[str, Any]:
    """The commit the code that ran is from, and whether the checkout differs from it, outputs of the pipeline's
    stages (dvc.yaml's outs, dvc.lock) not counted; in a scratch workspace also the project commit it was copied
    from and whether that checkout differed (the workspace's manifest; elsewhere the same commit)."""
    outs = ["dvc.lock"]
    stages = read_yaml("dvc.yaml").get("stages", {}) if Path("dvc.yaml").exists() else {}
    for stage in stages.values():
        for entry in (*stage.get("outs", []), *stage.get("metrics", []), *stage.get("plots", [])):
            outs.append(next(iter(entry)) if isinstance(entry, dict) else entry)
    status = _git("status", "--porcelain", "--untracked-files=all")
    dirty = None if status is None else any(not any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs)
                                            for f in (line[3:] for line in status.splitlines()))
    commit = _git("rev-parse", "HEAD")
    project = json.loads(WORKSPACE_MANIFEST.read_text())["project"] if WORKSPACE_MANIFEST.exists() else {}
    return {"git_commit": commit, "git_dirty": dirty, "project_commit": project.get("commit", commit),
            "project_dirty": project.get("dirty", dirty)}


def lineage(base: dict[str, Any], p: TrainParams, metrics: dict[str, Any]) -> dict[str, Any]:
    """Everything needed to trust that this adapter is what its params say."""
    from importlib import metadata

    import torch

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    # dvc writes each stage's lock entry as it finishes: validate's outs are train's inputs
    lock = read_yaml("dvc.lock").get("stages", {}) if Path("dvc.lock").exists() else {}
    inputs = {out["path"]: out.get("md5") or out.get("hash") for out in lock.get("validate", {}).get("outs", [])}
    cuda = torch.cuda.is_available()
    return {
        **source(), "inputs": inputs, "data_sha256": metrics.get("data_sha256"),
        "base_model": base["model"], "base_model_fingerprint": model_fingerprint(base["model"]),
        "base_model_revision": model_revision(base["model"], offline=bool(base.get("hf_offline", True))),
        "method": p.method, "seed": base["seed"],
        "params": {"base": {k: base[k] for k in BASE_KEYS}, SECTION: dataclasses.asdict(p)},
        "params_file": read_yaml().get(SECTION),
        "versions": {**{d: version(d) for d in ("torch", "transformers", "peft", "trl", "datasets", "accelerate",
                                                "dvc", "bitsandbytes")},
                     "python": platform.python_version()},
        "hardware": {"device": "cuda" if cuda else "cpu",
                     "gpu": torch.cuda.get_device_name(0) if cuda else None,
                     "gpu_count": torch.cuda.device_count() if cuda else 0,
                     "world_size": metrics.get("world_size"),
                     "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                     "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "wall_s": metrics.get("wall_s"), "tokens_seen": metrics.get("tokens_seen"), "steps": metrics.get("steps"),
        "resumed_from_step": metrics.get("resumed_from_step"), "checkpoint_key": metrics.get("checkpoint_key"),
        "eval_ce": metrics.get("eval_ce"), "emissions": metrics.get("emissions"),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
