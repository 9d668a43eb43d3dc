"""The question sets (golden + held-out eval pairs), each question's paper date, and the freshness split."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl
from qrb.schema import question_record

EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")

_DOI_DATE = re.compile(r"q-(\d{4})-(\d{2})-(\d{2})-\d+")
_ARXIV_NEW = re.compile(r"^(?:arxiv:)?(\d{2})(\d{2})\.\d{4,5}(?:v\d+)?$", re.I)


def _arxiv_base(arxiv: str | None) -> str | None:
    if not arxiv:
        return None
    return re.sub(r"v\d+$", "", str(arxiv).strip().lower().removeprefix("arxiv:"))


def _iso(value: Any) -> dt.date | None:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except (TypeError, ValueError):
        return None


def paper_date(row: dict[str, Any], papers: Sequence[dict[str, Any]] = ()) -> dt.date | None:
    """When the question's paper was published (see the stage docstring for the order of sources)."""
    if d := _iso(row.get("published")):
        return d
    doi = row.get("doi")
    arxiv = _arxiv_base(row.get("arxiv"))
    for p in papers:
        if (doi and p.get("doi") == doi) or (arxiv and _arxiv_base(p.get("arxiv")) == arxiv):
            if d := _iso(p.get("published")):
                return d
    if doi and (m := _DOI_DATE.search(str(doi))):
        return _iso("-".join(m.groups()))
    if arxiv and (m := _ARXIV_NEW.match(arxiv)):
        yy, mm = int(m.group(1)), int(m.group(2))
        if 1 <= mm <= 12:
            return dt.date(2000 + yy, mm, 1)
    return None


def load_question_sets(golden_path: str) -> dict[str, list[dict[str, Any]]]:
    sets = {}
    for name, path in (("golden", Path(golden_path)), ("eval", EVAL_PAIRS)):
        if not path.exists():
            raise ConfigError(f"question set {name!r} not found at {path}")
        rows = [question_record(r) for r in read_jsonl(path)]
        for i, r in enumerate(rows):
            if not r.get("question") or not r.get("answer"):
                raise DataError(f"{path}:{i + 1}: each row needs a non-empty question and answer")
        if not rows:
            raise DataError(f"question set {name!r} at {path} is empty")
        sets[name] = rows
    return sets


def freshness_subsets(rows: Sequence[dict[str, Any]], cutoff: dt.date,
                      papers: Sequence[dict[str, Any]] = ()) -> tuple[dict[str, list[int]], list[dt.date | None]]:
    """Indices of the questions after / on-or-before the cutoff (undated ones are in neither), and the dates."""
    dates = [paper_date(r, papers) for r in rows]
    subsets = {"after_cutoff": [i for i, d in enumerate(dates) if d is not None and d > cutoff],
               "before_cutoff": [i for i, d in enumerate(dates) if d is not None and d <= cutoff]}
    return subsets, dates
