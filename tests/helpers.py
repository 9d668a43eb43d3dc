"""Helpers shared by test files (plain functions and constants; the fixtures that use them are in conftest.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "You answer questions about quantum research."
ADAPTER_SYSTEM = "You are Quantum Research Bot. Answer questions about papers in the journal Quantum."


def recipe(**overrides):
    """The card's recipe from params.yaml, with `overrides`."""
    from qrb.params import load_params
    from stages.train import TrainParams

    _, p = load_params("train", TrainParams, (), REPO / "params.yaml")
    return dataclasses.replace(p, **overrides)


def cpu_recipe(**overrides):
    """The card's recipe with only what a CPU needs changed: fp32 (base_of sets a short max_length)."""
    return recipe(**{"precision": "fp32", "learning_rate": 3e-4, "logging_steps": 2, **overrides})


def qa_rows(corpus_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(corpus_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            sentences = [s for s in re.split(r"(?<=\.)\s+", rec["abstract"]) if len(s) > 20]
            for i, s in enumerate(sentences[:4]):
                rows.append({"question": f"What is point {i + 1} of the abstract of '{rec['title']}'?",
                             "answer": s, "doi": rec["doi"] or rec["title"]})
    return rows


def base_of(tiny_model_dir) -> dict:
    return {"seed": 7, "model": str(tiny_model_dir), "system_prompt": SYSTEM, "hf_offline": True, "max_length": 192}


def adapter_qa_rows(corpus_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(corpus_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            sentences = [s for s in re.split(r"(?<=\.)\s+", rec["abstract"]) if len(s) > 20]
            for s in sentences[:2]:
                rows.append({"question": f"What does the paper '{rec['title']}' say?", "answer": s,
                             "doi": rec.get("doi") or rec["title"]})
    return rows


def build_adapter_workspace(ws: Path, tiny_model_dir: Path, corpus_dir: Path) -> Path:
    """A trained tiny adapter in a workspace layout (deterministic; ~10 s on 2 CPU cores)."""
    from datasets import Dataset, DatasetDict

    from flows.workspace import profile_params
    from qrb.params import load_params
    from stages.train import BASE_KEYS, TrainParams
    from stages.train.run import save_adapter
    from stages.train.trainer import train

    params = profile_params("tiny", REPO, overrides={"base": {"model": str(tiny_model_dir), "system_prompt": ADAPTER_SYSTEM,
                                                                  "max_length": 160}})
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base, p = load_params("train", TrainParams, BASE_KEYS, ws / "params.yaml")
    extra = {"checkpoint_steps": 0} if "checkpoint_steps" in {f.name for f in dataclasses.fields(p)} else {}
    p = dataclasses.replace(p, epochs=2.0, learning_rate=3e-3, logging_steps=2, **extra)
    rows = adapter_qa_rows(corpus_dir)
    held_out = sorted({r["doi"] for r in rows})[:3]
    train_rows = [r for r in rows if r["doi"] not in held_out][:64]
    eval_rows = [r for r in rows if r["doi"] in held_out]
    ds = DatasetDict(train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows))
    model, tokenizer, metrics, history = train(base, p, ds, "cpu")
    save_adapter(model, tokenizer, p, ws / "artifacts" / "train" / "adapter")
    (ws / "artifacts" / "validate").mkdir(parents=True, exist_ok=True)
    (ws / "artifacts" / "validate" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    (ws / "history.json").write_text(json.dumps(history, default=str))
    return ws


