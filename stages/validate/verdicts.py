"""What the LLM judge reads and what it answers (see `stages.validate.judge`): the paper and pair blocks of its
prompt, the tolerant reply parser, and the verdict cache (SQLite, one commit per verdict). No openai import."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrb.io import open_sqlite

from .features import content_tokens

SYSTEM = ("You check question-answer pairs against the paper they were written from, before they are used for "
          "training. You reply with JSON only.")
EXCERPT_CHARS = 6000  # of the full text, around the passage the answer draws on (pairs written from a full-text chunk)
_DELIM = re.compile(r"<\s*/?\s*(?:paper|pair)\s*>", re.I)


def clean(text: Any) -> str:
    """One line that cannot open or close a `<paper>` or `<pair>` block."""
    return _DELIM.sub("[data]", " ".join(str(text or "").split()))


def excerpt(full_text: str, answer: str, limit: int = EXCERPT_CHARS) -> str:
    """The paragraphs of the full text around the one sharing most content words with the answer."""
    paras = [p for p in re.split(r"\n\s*\n", full_text) if p.strip()]
    if not paras:
        return ""
    want = set(content_tokens(answer))
    best = max(range(len(paras)), key=lambda i: (len(want & set(content_tokens(paras[i]))), -i))
    lo = hi = best
    size = len(paras[best])
    while True:  # widen alternately after and before the best paragraph while it fits
        grown = False
        for j in (hi + 1, lo - 1):
            if 0 <= j < len(paras) and size + len(paras[j]) <= limit:
                size += len(paras[j])
                lo, hi = min(lo, j), max(hi, j)
                grown = True
        if not grown:
            break
    return clean(" ".join(paras[lo:hi + 1]))[:limit]


def paper_block(paper: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """What the judge reads of the paper: title, DOI, abstract, and for a pair written from the full text (chunk >
    0), the passage of the full text it draws on."""
    lines = ["<paper>", f"Title: {clean(paper.get('title'))}", f"DOI: {clean(paper.get('doi'))}", "Abstract:",
             clean(paper.get("abstract"))]
    full = paper.get("full_text")
    if row.get("chunk") not in (0, "0", None) and isinstance(full, str) and full.strip():
        lines += ["Excerpt of the full text:", excerpt(full, str(row.get("answer") or ""))]
    return "\n".join(lines + ["</paper>"])


def pair_block(question: str, answer: str) -> str:
    return "\n".join(["<pair>", f"Question: {clean(question)}", f"Answer: {clean(answer)}", "</pair>"])


@dataclass(frozen=True)
class Item:
    row_id: str
    doi: str
    question: str
    answer: str
    paper: str  # the rendered paper block


@dataclass(frozen=True)
class Verdict:
    answerable: int | None  # 1-5; None when the judge gave no readable verdict
    correct: int | None
    reason: str             # the judge's reason, or why there is no verdict
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.answerable is not None and self.correct is not None


def make_item(row_id: str, row: Mapping[str, Any], paper: Mapping[str, Any]) -> Item:
    return Item(row_id, str(row.get("doi") or ""), str(row.get("question") or ""), str(row.get("answer") or ""),
                paper_block(paper, row))


def messages(template: str, item: Item) -> list[dict[str, str]]:
    user = template.replace("{{paper}}", item.paper).replace("{{pair}}", pair_block(item.question, item.answer))
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)
_LINE = {k: re.compile(rf"\b{k}\b\W{{0,4}}([1-5])\b", re.I) for k in ("answerable", "correct")}
_REASON = re.compile(r"\breason\b\W{0,4}(.+)", re.I)


def _score(v: Any) -> int | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(round(f)) if 1 <= f <= 5 else None


def parse_verdict(text: str | None) -> tuple[int, int, str] | None:
    """(answerable, correct, reason) from a reply, or None when it holds no readable verdict."""
    text = _THINK.sub(" ", text or "")
    dec = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            low = {str(k).lower(): v for k, v in obj.items()}
            a, c = _score(low.get("answerable")), _score(low.get("correct"))
            if a is not None and c is not None:
                return a, c, " ".join(str(low.get("reason") or "").split())[:500]
    found = {k: p.search(text) for k, p in _LINE.items()}
    if all(found.values()):
        reason = _REASON.search(text)
        return (int(found["answerable"].group(1)), int(found["correct"].group(1)),
                " ".join(reason.group(1).split())[:500] if reason else "")
    return None


class VerdictCache:
    """SQLite (WAL), one commit per verdict; shared by the request threads behind a lock."""

    def __init__(self, path: Path) -> None:
        self.db = open_sqlite(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, created REAL NOT NULL, doi TEXT, "
                        "answerable INTEGER NOT NULL, correct INTEGER NOT NULL, reason TEXT NOT NULL, "
                        "prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, response_id TEXT)")
        self.db.commit()
        self.lock = threading.Lock()

    def get_many(self, keys: set[str]) -> dict[str, tuple[int, int, str, int, int]]:
        with self.lock:
            rows = self.db.execute("SELECT key, answerable, correct, reason, prompt_tokens, completion_tokens "
                                   "FROM verdicts").fetchall()
        return {r[0]: tuple(r[1:]) for r in rows if r[0] in keys}

    def put(self, key: str, doi: str, verdict: tuple[int, int, str], pt: int, ct: int, response_id: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (key, time.time(), doi, *verdict, pt, ct, response_id))
            self.db.commit()

    def close(self) -> None:
        with self.lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.db.close()
