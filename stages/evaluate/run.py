"""The evaluate stage's I/O: the adapter model, the question sets, the papers' dates, the apps' retrieval index and
the LLM grader's prompt and cache in; the core (`stages.evaluate.core.evaluate`); the outputs
(`stages.evaluate.report`) and the grader's cache out. See `stages.evaluate`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError
from qrb.io import read_jsonl
from qrb.retrieval import open_index
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, EvaluateParams
from .core import evaluate
from .judge import load_cache, load_prompt, save_cache
from .questions import load_question_sets
from .report import model_labels, write_outputs

ADAPTER_DIR = Path("artifacts/train/adapter")
PAPERS = Path("artifacts/scrape/papers.jsonl")


def load_adapter_model(base: dict[str, Any], device: str):
    from qrb.chat import load_with_adapter

    model, tokenizer = load_with_adapter(base["model"], ADAPTER_DIR,
                                         dtype=None if device == "cpu" else "auto")
    model = model.to(device)
    model.eval()
    return model, tokenizer


def load_papers() -> list[dict[str, Any]]:
    if not PAPERS.exists():  # the questions are dated by their papers
        raise ConfigError(f"{PAPERS} not found (the questions are dated by their papers): run `dvc repro scrape`")
    return list(read_jsonl(PAPERS))


def require_device(model: str) -> str:
    """The device the adapter's training recipe needs (its lineage.json): a bf16/fp16/nf4 recipe is a GPU one."""
    from qrb.chat import require_hardware

    lineage = ADAPTER_DIR / "lineage.json"
    train = (json.loads(lineage.read_text()).get("params") or {}).get("train") or {} if lineage.exists() else {}
    return require_hardware(model, "nf4" if train.get("method") == "qlora" else train.get("precision", "fp32"))


def run(base: dict[str, Any], p: EvaluateParams, args) -> None:
    from transformers import set_seed

    device = require_device(base["model"])
    papers = load_papers()
    set_seed(base["seed"])
    sets = load_question_sets(p.golden)
    if p.grader is not None:
        load_prompt()  # a missing prompt fails now, not after every answer was generated
    retrieval = open_index() if p.rag else None  # the apps' retriever and `retrieval:` params
    cache = load_cache()
    model, tokenizer = load_adapter_model(base, device)
    try:
        metrics, predictions, skipped = evaluate(base, p, model, tokenizer, sets, papers=papers,
                                                 retrieval=retrieval, grader_cache=cache)
    finally:  # the grades already paid for are kept even if the run fails later (an empty file without a grader)
        save_cache(cache)
    labels = model_labels(base["model"], p, retrieval[1] if retrieval else None)
    print(write_outputs(metrics, predictions, labels, p, skipped))


def main(argv: list[str] | None = None) -> None:
    import stages.evaluate

    run_stage(stages.evaluate.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
