"""The question sets (golden, seen papers / new questions, held-out eval pairs, invented papers), each question's
first-public date, and the freshness split."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl
from qrb.schema import question_record

log = logging.getLogger(__name__)

EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")
SEEN_PAIRS = Path("artifacts/validate/seen.jsonl")
INVENTED = Path("artifacts/validate/invented.jsonl")  # questions about papers that do not exist

_DOI_DATE = re.compile(r"q-(\d{4})-(\d{2})-(\d{2})-\d+")
_ARXIV_NEW = re.compile(r"^(\d{2})(\d{2})\.\d{4,5}$")                    # 2306.08595 (since April 2007)
_ARXIV_OLD = re.compile(r"^[a-z-]+(?:\.[a-z]{2})?/(\d{2})(\d{2})\d{3}$")  # quant-ph/0601001 (before)


def _arxiv_base(arxiv: str | None) -> str | None:
    if not arxiv:
        return None
    return re.sub(r"v\d+$", "", str(arxiv).strip().lower().removeprefix("arxiv:").strip())


def arxiv_v1_month(arxiv: str | None) -> dt.date | None:
    """The first day of the month the preprint's v1 appeared: an arXiv id's YYMM is its v1 month (new and old style
    ids); None for anything else."""
    base = _arxiv_base(arxiv)
    m = (_ARXIV_NEW.match(base) or _ARXIV_OLD.match(base)) if base else None
    if not m:
        return None
    yy, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= mm <= 12:
        return None
    return dt.date((1900 if yy >= 91 else 2000) + yy, mm, 1)  # arXiv started in August 1991


def _iso(value: Any) -> dt.date | None:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except (TypeError, ValueError):
        return None


def paper_date(row: dict[str, Any], papers: Sequence[dict[str, Any]] = ()) -> dt.date | None:
    """When the question's paper first became public: the earliest of its arXiv v1 month and its journal date.

    A journal date (the row's `published`, its paper's in papers.jsonl matched by DOI or arXiv id, else the DOI's
    q-YYYY-MM-DD) is often months after the preprint; the arXiv id (the row's or its paper's) dates v1 to the month.
    """
    doi = row.get("doi")
    arxiv = _arxiv_base(row.get("arxiv"))
    paper = next((p for p in papers if (doi and p.get("doi") == doi)
                  or (arxiv and _arxiv_base(p.get("arxiv")) == arxiv)), None)
    journal = _iso(row.get("published")) or (_iso(paper.get("published")) if paper else None)
    if journal is None and doi and (m := _DOI_DATE.search(str(doi))):
        journal = _iso("-".join(m.groups()))
    preprint = arxiv_v1_month(arxiv) or (arxiv_v1_month(paper.get("arxiv")) if paper else None)
    known = [d for d in (journal, preprint) if d is not None]
    return min(known) if known else None


def _read_set(name: str, path: Path) -> list[dict[str, Any]]:
    rows = [question_record(r) for r in read_jsonl(path)]
    for i, r in enumerate(rows):
        if not r.get("question") or not r.get("answer"):
            raise DataError(f"{path}:{i + 1}: each row needs a non-empty question and answer")
    return rows


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
        rows = _read_set(name, path)
        if not rows:
            if name == "golden":
                raise DataError(f"question set {name!r} at {path} is empty")
            log.warning("question set %r at %s is empty: reported as n=0", name, path)
        sets[name] = rows
    return sets


def freshness_subsets(rows: Sequence[dict[str, Any]], cutoff: dt.date,
                      papers: Sequence[dict[str, Any]] = ()) -> tuple[dict[str, list[int]], list[dt.date | None]]:
    """Indices of the questions after / on-or-before the cutoff (undated ones are in neither), and the dates."""
    dates = [paper_date(r, papers) for r in rows]
    subsets = {"after_cutoff": [i for i, d in enumerate(dates) if d is not None and d > cutoff],
               "before_cutoff": [i for i, d in enumerate(dates) if d is not None and d <= cutoff]}
    return subsets, dates
