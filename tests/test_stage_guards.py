"""A stage stops in one line, before any long work, when what it needs is missing (no silent fallback)."""

from __future__ import annotations

import json

import pytest
import yaml

from qrb.errors import ConfigError

from helpers import REPO


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
    """The flagship adapter (bf16, or qlora's nf4) is evaluated on a GPU as it was trained; the papers weigh fact
    recall (IDF) whatever the RAG setting, so their absence is an error, not a warning."""
    for train in ({"method": "lora", "precision": "bf16"}, {"method": "qlora", "precision": "fp32"}):
        assert "needs a CUDA GPU" in _evaluate(tmp_path, monkeypatch, capsys, train)
    err = _evaluate(tmp_path, monkeypatch, capsys, {"method": "lora", "precision": "fp32"})
    assert err.startswith("evaluate: artifacts/scrape/papers.jsonl not found"), err
