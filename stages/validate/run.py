"""The validate stage's I/O (see `stages.validate`): read papers, pairs and seen questions, run the core, write
quarantine, metrics and Data Docs, and, when the gate passes, the clean dataset (a `datasets.DatasetDict` and JSON
Lines) and the clean seen questions."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import typing
from pathlib import Path
from typing import Any

from qrb import llm
from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl, write_jsonl, write_metrics
from qrb.schema import PAIR_FIELDS, QAPair
from qrb.stage import run_stage

from . import BASE_KEYS, DOCS_OUT, PARAMS_CLASS, QUARANTINE_OUT, REPORT_OUT, SECTION, ValidateParams
from .core import summary, validate, write_index_html
from .features import is_question
from .judge import Judge

log = logging.getLogger(__name__)

PAPERS_IN = Path("artifacts/scrape/papers.jsonl")
TRAIN_IN = Path("artifacts/generate/train.jsonl")
EVAL_IN = Path("artifacts/generate/eval.jsonl")
SEEN_IN = Path("artifacts/generate/seen.jsonl")
INVENTED_IN = Path("artifacts/generate/invented.jsonl")
OUT_DIR = Path("artifacts/validate")
DATASET_OUT = OUT_DIR / "dataset"
TRAIN_OUT = OUT_DIR / "train.jsonl"
EVAL_OUT = OUT_DIR / "eval.jsonl"
SEEN_OUT = OUT_DIR / "seen.jsonl"
INVENTED_OUT = OUT_DIR / "invented.jsonl"  # questions about invented papers: passed through, questions checked
OPENAI_OUT = OUT_DIR / "openai"
METRICS_OUT = Path("metrics/validate.json")  # the headline numbers (dvc metrics)
JUDGE_PROMPT = Path("prompts/judge.txt")
JUDGE_CACHE = Path("cache/validate/judge.sqlite")

HEADLINE = ("rows_out.train", "rows_out.eval", "rows_quarantined", "fail_rate", "grounding_mean",
            "similarity_mean", "seen.rows_out", "judge.judge_unanswerable", "judge.judge_incorrect",
            "judge.judge_failed", "judge.cost_usd")


def _read_pairs(path: Path, stage: str) -> list[Any]:
    if not path.exists():
        raise ConfigError(f"{path} not found (run the {stage} stage first)")
    return list(read_jsonl(path))


def save_dataset(train: list[dict[str, Any]], eval_: list[dict[str, Any]], out: Path) -> None:
    """A `datasets.DatasetDict` ("train", "eval") with the input pairs' columns, written atomically. Either split
    (or both) may be empty: it keeps the columns and types, and `datasets.load_from_disk` reads it back."""
    import datasets

    datasets.disable_progress_bars()
    rows = train + eval_
    keys = list(PAIR_FIELDS) + sorted({k for r in rows for k in r} - set(PAIR_FIELDS))
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(QAPair) if f.default is not dataclasses.MISSING}
    cols = {k: [r.get(k, defaults.get(k)) for r in rows] for k in keys}
    chunk_types = {type(v) for v in cols["chunk"]}
    if len(chunk_types) > 1:  # ints in some rows, strings in others: one arrow type for the column
        log.warning("validate: `chunk` mixes %s; stored as strings in the dataset",
                    sorted(t.__name__ for t in chunk_types))
        cols["chunk"] = [str(v) for v in cols["chunk"]]
    if rows:
        full = datasets.Dataset.from_dict(cols)
    else:  # nothing to infer the types from: the schema's
        hints = typing.get_type_hints(QAPair)
        feats = datasets.Features({k: datasets.List(datasets.Value("string")) if k == "aliases"
                                   else datasets.Value("int64" if hints.get(k) is int else "string") for k in keys})
        full = datasets.Dataset.from_dict({k: [] for k in keys}, features=feats)
    # datasets 5.2's `select(range(n, n))` on n rows raises IndexError instead of returning no rows: an empty range
    # is an empty index list
    dd = datasets.DatasetDict({name: full.select(range(lo, hi) if hi > lo else [])
                               for name, lo, hi in (("train", 0, len(train)), ("eval", len(train), len(rows)))})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # a 0-row split would be saved as 0 shards, which load_from_disk (datasets 5.2) cannot read back: give it one
    dd.save_to_disk(str(tmp), num_shards={k: 1 for k, d in dd.items() if d.num_rows == 0})
    _replace_dir(tmp, out)


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def write_openai(out_dir: Path, splits: dict[str, list[dict[str, Any]]], system_prompt: str) -> None:
    """The clean pairs in the format other trainers read: OpenAI chat fine-tuning JSON Lines, one conversation a
    line, `{"messages": [system, user, assistant]}` with the system prompt train uses (OpenAI's fine-tuning API,
    trl's SFTTrainer, LLaMA-Factory with `formatting: sharegpt` and OpenAI tags, axolotl's `type: chat_template`).
    `messages` alone, as OpenAI's format defines a line; the provenance stays in train.jsonl / eval.jsonl."""
    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", [{"messages": [
            {"role": "system", "content": system_prompt}, {"role": "user", "content": r["question"]},
            {"role": "assistant", "content": r["answer"]}]} for r in rows])


def load_judge_template(path: Path = JUDGE_PROMPT) -> str:
    if not path.exists():
        raise ConfigError(f"prompt template {path} not found (validate.judge.endpoint is set)")
    text = path.read_text(encoding="utf-8").strip()
    for placeholder in ("{{paper}}", "{{pair}}"):
        if placeholder not in text:
            raise ConfigError(f"{path} has no {placeholder} placeholder")
    return text


def run(base: dict[str, Any], p: ValidateParams, args) -> None:
    for name in ("great_expectations", "datasets", "sentence_transformers", "transformers", "urllib3", "httpx",
                 "httpx2", "httpcore", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    papers = _read_pairs(PAPERS_IN, "scrape")
    train = _read_pairs(TRAIN_IN, "generate")
    eval_ = _read_pairs(EVAL_IN, "generate")
    seen = _read_pairs(SEEN_IN, "generate")
    invented = _read_pairs(INVENTED_IN, "generate")
    log.info("validating %d train + %d eval pairs and %d seen questions against %d papers", len(train), len(eval_),
             len(seen), len(papers))

    docs_tmp = DOCS_OUT.parent / f".{DOCS_OUT.name}.tmp"
    shutil.rmtree(docs_tmp, ignore_errors=True)
    docs_tmp.mkdir(parents=True)
    template = load_judge_template() if p.judge.endpoint is not None else ""
    cache = llm.Cache(JUDGE_CACHE)  # created even without a judge: cache/validate is a DVC out
    judge = Judge(p.judge, template, cache) if p.judge.endpoint is not None else None
    try:
        outcome = validate(train, eval_, papers, p, docs_dir=docs_tmp, seen=seen, judge=judge)
        if judge is not None:
            outcome.metrics["judge"] = {**outcome.metrics.get("judge", {}), **judge.summary()}
        write_index_html(docs_tmp, outcome, p)
    except BaseException:
        shutil.rmtree(docs_tmp, ignore_errors=True)
        raise
    finally:
        cache.close()
    _replace_dir(docs_tmp, DOCS_OUT)
    write_jsonl(QUARANTINE_OUT, outcome.quarantine)
    write_metrics(METRICS_OUT, REPORT_OUT, outcome.metrics, HEADLINE)
    if outcome.gate_passed:
        save_dataset(outcome.train, outcome.eval, DATASET_OUT)
        write_jsonl(TRAIN_OUT, outcome.train)
        write_jsonl(EVAL_OUT, outcome.eval)
        write_jsonl(SEEN_OUT, outcome.seen)
        write_jsonl(INVENTED_OUT, [r for r in invented if isinstance(r, dict) and is_question(r.get("question", ""))])
        write_openai(OPENAI_OUT, {"train": outcome.train, "eval": outcome.eval}, base["system_prompt"])
    print(summary(outcome), file=sys.stderr)
    if not outcome.gate_passed:
        failed = [c.reason for c in outcome.dataset_results if not c.success]
        raise DataError(f"the gate failed ({', '.join(failed)}): the clean dataset was not written; "
                        f"see {QUARANTINE_OUT} and {DOCS_OUT}/index.html")


def main(argv: list[str] | None = None) -> None:
    import stages.validate

    run_stage(stages.validate.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
