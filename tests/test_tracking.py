"""Training tracked in DVC's own layout: `-S train.report_to=dvclive` in a tiny workspace, then `dvc exp show` and
`dvc plots show` read DVCLive's files; a tracker that is not installed is a one-line config error."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import qa_rows, split_rows


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    from flows.workspace import venv_env

    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, capture_output=True, text=True, timeout=600,
                          env=venv_env({"QRB_CPU_THREADS": "1", "OMP_NUM_THREADS": "1"}))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, corpus_dir) -> Path:
    """A tiny workspace at the point train starts: the base model tracked by DVC, validate's dataset and scrape's
    papers, report_to none."""
    from datasets import Dataset, DatasetDict

    from flows.workspace import commit, prepare

    ws = prepare(tmp_path_factory.mktemp("tracking") / "ws", "tiny", overrides={
        "train": {"report_to": "none", "epochs": 2, "checkpoint_steps": 0, "emissions_country": None}})
    shutil.copytree(tiny_model_dir, ws / "models/tiny-llama")
    assert dvc(ws, "add", "-q", "models/tiny-llama").returncode == 0
    train, eval_ = split_rows(qa_rows(corpus_dir), 32, 8)
    DatasetDict(train=Dataset.from_list(train), eval=Dataset.from_list(eval_)).save_to_disk(
        str(ws / "artifacts/validate/dataset"))
    (ws / "artifacts/scrape").mkdir(parents=True)
    (ws / "artifacts/scrape/papers.jsonl").write_text("".join(p.read_text() for p in sorted(corpus_dir.glob("*.jsonl"))))
    commit(ws, "base model")
    return ws


@pytest.mark.slow
def test_dvclive_curves_show_in_dvc_exp_show_and_plots_show(ws):
    from flows import overrides

    overrides.apply(ws / "params.yaml", overrides.check(ws, {"train.report_to": "dvclive"}))  # what `qrb run -S` does
    pipeline = (ws / "dvc.yaml").read_text()
    proc = dvc(ws, "repro", "-s", "train")  # (`dvc exp run` would first check out validate's unlocked outs: none)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DVCLive's defaults would have added its own entries to dvc.yaml (and saved an experiment of its own)
    assert (ws / "dvc.yaml").read_text() == pipeline and not (ws / "dvclive/dvc.yaml").exists()

    show = dvc(ws, "exp", "show", "--no-pager", "--csv")
    assert show.returncode == 0, show.stderr
    header, *rows = show.stdout.splitlines()
    assert {"loss", "eval.loss", "learning_rate", "step"} <= set(header.split(",")), header
    assert not {"eval.runtime", "total_flos", "train.samples_per_second"} & set(header.split(","))  # no curves
    assert "train.report_to" in header.split(",") and "dvclive" in rows[0].split(","), show.stdout

    [plot] = json.loads(dvc(ws, "plots", "show", "--json").stdout)["data"]["loss"]
    points = plot["content"]["data"]["values"]
    steps = {name: [int(d["step"]) for d in points if d["filename"] == name] for name in ("loss.tsv", "eval/loss.tsv")}
    # 32 rows / batch 8 = 4 steps an epoch, 2 epochs, a train loss every 5 steps (tiny profile), eval per epoch
    assert steps == {"loss.tsv": [5], "eval/loss.tsv": [4, 8]}, steps
    assert all(float(d["loss"]) > 0 for d in points)


def test_a_tracker_that_is_not_installed_is_a_config_error_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from helpers import recipe
    from qrb.errors import ConfigError
    from stages.train.run import run

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    monkeypatch.chdir(tmp_path)  # no dataset, no model: the check comes first
    with pytest.raises(ConfigError, match=r"^`train.report_to: wandb` is not installed \(pip install wandb\)$"):
        run({"model": "models/none"}, recipe(report_to="wandb"), None)


def test_a_resumed_run_keeps_the_curve_before_its_checkpoint(tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from stages.train.hooks import dvclive_callback

    monkeypatch.chdir(tmp_path)  # no git, no DVC repo: DVCLive only writes its folder
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True)
    state = TrainerState(global_step=8, log_history=[{"loss": 3.0, "step": 5, "epoch": 1.0},
                                                     {"eval_loss": 2.9, "step": 8, "epoch": 2.0}])
    cb = dvclive_callback(tmp_path / "dvclive")
    cb.on_train_begin(args, state, TrainerControl())
    state.global_step = 10
    cb.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "epoch": 2.5, "train_runtime": 9.1})

    def rows(rel: str) -> list[tuple[int, float]]:
        text = (tmp_path / "dvclive/plots/metrics" / rel).read_text()
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(text.splitlines(), delimiter="\t")]

    assert rows("loss.tsv") == [(5, 3.0), (10, 2.5)] and rows("eval/loss.tsv") == [(8, 2.9)]
    assert json.loads((tmp_path / "dvclive/metrics.json").read_text()) == {"loss": 2.5, "epoch": 2.5, "step": 10,
                                                                           "eval": {"loss": 2.9}}
