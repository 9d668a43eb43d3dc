"""Two training processes on the CPU through `accelerate launch`: DDP works and only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.workspace import profile_params

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_two_ranks_on_cpu_train_one_adapter_written_once(tmp_path, tiny_model_dir, corpus_dir):
    from datasets import Dataset, DatasetDict

    from helpers import qa_rows

    rows = qa_rows(corpus_dir)
    held_out = sorted({r["doi"] for r in rows})[:5]
    DatasetDict(train=Dataset.from_list([r for r in rows if r["doi"] not in held_out]),
                eval=Dataset.from_list([r for r in rows if r["doi"] in held_out])).save_to_disk(
        str(tmp_path / "artifacts/validate/dataset"))
    params = profile_params("tiny", REPO)
    params["base"]["model"] = str(tiny_model_dir)
    params["train"].update(epochs=1, checkpoint_steps=0, emissions_country=None)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    launcher = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "-m", "stages.train"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("trainable of") == 2  # both ranks built the model
    assert log.count("adapter written to") == 1  # only rank 0 wrote
    metrics = json.loads((tmp_path / "reports/train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 0
    assert (tmp_path / "artifacts/train/adapter/adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "artifacts/train/adapter/lineage.json").read_text())["hardware"]["world_size"] == 2
