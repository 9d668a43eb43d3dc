"""A stage stops in one line, before any long work, when what it needs is missing (no silent fallback)."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import REPO
from qrb.errors import ConfigError


def _evaluate(tmp_path, monkeypatch, capsys, train: dict) -> str:
    import torch

    from stages.evaluate.run import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(yaml.safe_load((REPO / "params.yaml").read_text())))
    adapter = tmp_path / "artifacts/train/adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "lineage.json").write_text(json.dumps({"params": {"train": train}}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_evaluate_needs_the_gpu_its_adapter_was_trained_for_and_the_papers(tmp_path, monkeypatch, capsys):
    """The flagship adapter (bf16, or qlora's nf4) is evaluated on a GPU as it was trained; the papers date the
    questions whatever the RAG setting, so their absence is an error, not a warning."""
    for train in ({"method": "lora", "precision": "bf16"}, {"method": "qlora", "precision": "fp32"}):
        assert "needs a CUDA GPU" in _evaluate(tmp_path, monkeypatch, capsys, train)
    err = _evaluate(tmp_path, monkeypatch, capsys, {"method": "lora", "precision": "fp32"})
    assert err.startswith("evaluate: artifacts/scrape/papers.jsonl not found"), err


def test_in_ci_a_missing_browser_fails_the_browser_tests_instead_of_skipping_them(monkeypatch):
    import shutil

    import helpers

    monkeypatch.setattr(shutil, "which", lambda name: None)          # no chromium, no chromedriver
    for ci, outcome in (("true", pytest.fail.Exception), ("", pytest.skip.Exception)):  # a laptop: skipped
        monkeypatch.setenv("CI", ci)
        with pytest.raises(BaseException) as e, helpers.headless_chromium():
            pass
        assert e.type is outcome and "chromium" in str(e.value), (ci, e)


def test_ci_run_stops_when_chromium_cannot_be_installed(tmp_path):
    """.ci/run with an apt-get that fails: it exits non-zero before `make test` (no silent skip of the browser tests)."""
    import shutil
    import subprocess

    bin_ = tmp_path / "bin"                                            # a PATH without chromium
    bin_.mkdir()
    (bin_ / "dirname").symlink_to(shutil.which("dirname"))
    for name, body in (("apt-get", "exit 100"), ("make", f"/bin/touch {tmp_path}/make-ran")):
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    proc = subprocess.run(["/bin/bash", str(REPO / ".ci" / "run")], env={"PATH": str(bin_), "CI": "true"},
                          capture_output=True, text=True)
    assert proc.returncode != 0 and not (tmp_path / "make-ran").exists(), proc.stdout + proc.stderr
    assert "chromium" in proc.stderr
