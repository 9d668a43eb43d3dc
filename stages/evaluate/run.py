"""The evaluate stage's I/O: the adapter model, the question sets (golden, seen papers / new questions, held-out
eval pairs, invented papers), the papers' dates, the apps' retrieval index and the LLM grader's prompt and cache in;
the core (`stages.evaluate.core.evaluate`); the outputs (`stages.evaluate.report`) and the grader's cache out. See
`stages.evaluate`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from qrb import llm
from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl
from qrb.model import read_gate
from qrb.retrieval import open_index
from qrb.schema import question_record
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, EvaluateParams
from .core import evaluate
from .judge import CACHE, load_prompt
from .report import model_labels, write_outputs

log = logging.getLogger(__name__)

ADAPTER_DIR = Path("artifacts/train/adapter")
PAPERS = Path("artifacts/scrape/papers.jsonl")
EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")
SEEN_PAIRS = Path("artifacts/validate/seen.jsonl")
INVENTED = Path("artifacts/validate/invented.jsonl")  # questions about papers that do not exist


def load_question_sets(golden_path: str) -> dict[str, list[dict[str, Any]]]:
    """{golden, seen, eval, invented}: rows with a question and a reference answer (and, where written, its
    short_answer, aliases and kind).

    Every file must exist (validate always writes seen.jsonl and eval.jsonl, possibly empty: a missing one is a
    stale workspace) but invented.jsonl, which workspaces from before it was written lack (an empty set, noted).
    The golden file is the user's and must not be empty; an empty seen, eval or invented split is scored as n=0.
    """
    sets = {}
    for name, path in (("golden", Path(golden_path)), ("seen", SEEN_PAIRS), ("eval", EVAL_PAIRS),
                       ("invented", INVENTED)):
        if name == "invented" and not path.exists():
            log.warning("no %s (a workspace from before validate wrote it): the invented set is empty", path)
            sets[name] = []
            continue
        if not path.exists():
            hint = "" if name == "golden" else " (validate writes it, possibly empty: run `dvc repro validate`)"
            raise ConfigError(f"question set {name!r} not found at {path}{hint}")
        rows = [question_record(r) for r in read_jsonl(path)]
        for i, r in enumerate(rows):
            if not r.get("question") or not r.get("answer"):
                raise DataError(f"{path}:{i + 1}: each row needs a non-empty question and answer")
        if not rows:
            if name == "golden":
                raise DataError(f"question set {name!r} at {path} is empty")
            log.warning("question set %r at %s is empty: reported as n=0", name, path)
        sets[name] = rows
    return sets


def run(base: dict[str, Any], p: EvaluateParams, args) -> None:
    from transformers import set_seed

    from qrb.model import load_with_adapter, require_hardware

    # the device the adapter's training recipe needs (its lineage.json): a bf16/fp16/nf4 recipe is a GPU one
    lineage = ADAPTER_DIR / "lineage.json"
    train = (json.loads(lineage.read_text()).get("params") or {}).get("train") or {} if lineage.exists() else {}
    recipe = "nf4" if train.get("method") == "qlora" else train.get("precision", "fp32")
    device = require_hardware(base["model"], recipe)
    if not PAPERS.exists():
        raise ConfigError(f"{PAPERS} not found (the questions are dated by their papers): run `dvc repro scrape`")
    papers = list(read_jsonl(PAPERS))
    set_seed(base["seed"])
    sets = load_question_sets(p.golden)
    if p.grader is not None:
        load_prompt()  # a missing prompt fails now, not after every answer was generated
    retrieval = open_index() if p.rag else None  # the apps' retriever and `retrieval:` params
    cache = llm.Cache(CACHE)  # created even without a grader: cache/evaluate is a DVC out
    model, tokenizer = load_with_adapter(base["model"], ADAPTER_DIR, dtype=None if device == "cpu" else "auto")
    model = model.to(device).eval()
    try:
        metrics, predictions, skipped = evaluate(base, p, model, tokenizer, sets, papers=papers,
                                                 retrieval=retrieval, grader_cache=cache,
                                                 gate=read_gate(ADAPTER_DIR))
    finally:  # every grade paid for was committed as it came, whatever happens later
        cache.close()
    labels = model_labels(base["model"], p, retrieval[1] if retrieval else None)
    print(write_outputs(metrics, predictions, labels, p, skipped))


def main(argv: list[str] | None = None) -> None:
    import stages.evaluate

    run_stage(stages.evaluate.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
