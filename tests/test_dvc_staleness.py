"""`dvc repro` staleness follows the params a stage reads: dvc.yaml lists a stage's whole section and the `base:` keys
it reads, so changing one of those makes the stage stale and changing a key it does not read does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN_FILES = ("artifacts/validate/dataset/dataset_dict.json", "artifacts/train/adapter/adapter_config.json",
               "cache/train/.keep", "metrics/train.json", "reports/train.json", "dvclive/metrics.json",
               "dvclive/params.yaml", "dvclive/plots/metrics/loss.tsv")
CARD_FILES = ("reports/scrape.json", "reports/generate.json", "reports/validate.json", "reports/evaluate.json",
              "artifacts/validate/train.jsonl", "artifacts/validate/eval.jsonl", "artifacts/validate/seen.jsonl",
              "artifacts/model_card/README.md")


def dvc(ws: Path, *args: str) -> str:
    from flows.workspace import venv_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A tiny workspace where train and model_card are locked (their deps and outs as a finished run leaves them)."""
    from flows.workspace import prepare

    ws = prepare(tmp_path_factory.mktemp("stale") / "ws", "tiny")
    for rel in ("artifacts/scrape/papers.jsonl", *TRAIN_FILES, *CARD_FILES):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("{}\n")
    dvc(ws, "commit", "-q", "-f", "train", "model_card")
    return ws


def stale(ws: Path, key: str, value) -> set[str]:
    """The stages of train and model_card that `dvc status` calls changed once params.yaml sets `key` to `value`
    (put back afterwards)."""
    from flows.overrides import apply
    from qrb.params import read_yaml

    node = read_yaml(ws / "params.yaml")
    for part in key.split("."):
        node = node[part]
    assert apply(ws / "params.yaml", {key: value}), f"{key} already is {value!r}"
    try:
        status = json.loads(dvc(ws, "status", "--json", "train", "model_card"))
    finally:
        apply(ws / "params.yaml", {key: node})
    return set(status)


def test_both_stages_start_up_to_date(ws):
    assert json.loads(dvc(ws, "status", "--json", "train", "model_card")) == {}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("train.lora.r", 5, {"train"}),                      # its own section, a nested key
    ("train.logging_steps", 3, {"train"}),               # any key of the section, hyper-parameter or not
    ("base.hf_offline", False, {"train"}),               # a base key train reads and model_card does not
    ("base.system_prompt", "Answer briefly.", {"train", "model_card"}),  # a base key both read
    ("model_card.title", "Another title", {"model_card"}),
    ("evaluate.max_new_tokens", 7, set()),               # a section neither reads
    ("generate.temperature", 0.1, set()),
])
def test_a_changed_key_makes_stale_exactly_the_stages_that_read_it(ws, key, value, expected):
    assert stale(ws, key, value) == expected
