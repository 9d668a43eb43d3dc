"""Small I/O helpers shared by the stages: atomic writes, JSON Lines, logging setup."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# flows/console.py reads a stage's own summary line in this format (the last INFO line of a `stages.*` logger)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rounded(obj: Any, digits: int = 6) -> Any:
    """Metrics to 6 decimals: float noise below that is not a change worth showing in `dvc metrics diff`."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def headline(full: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """The numbers of `full` at the dotted `keys` ("*" matches every key at its level), nested as in `full`: what
    `dvc metrics diff` and `dvc exp show` compare. Strings, booleans, lists, None and absent keys are left out (DVC
    would show a hash or a name as a metric column); the whole record belongs in a plain report file."""
    out: dict[str, Any] = {}

    def pick(node: Any, parts: list[str], dst: dict[str, Any]) -> None:
        if not isinstance(node, dict):
            return
        head, rest = parts[0], parts[1:]
        for key in (node if head == "*" else [head] if head in node else []):
            value = node[key]
            if rest:
                pick(value, rest, dst.setdefault(key, {}))
                if not dst[key]:
                    del dst[key]
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                dst[key] = value

    for dotted in keys:
        pick(full, dotted.split("."), out)
    return out


def write_metrics(metrics_path: str | Path, report_path: str | Path, full: dict[str, Any],
                  keys: Iterable[str]) -> None:
    """A stage's record: everything, rounded, in `report_path` (a plain out that the card and the flows read), and
    its headline numbers in `metrics_path` (the DVC metrics file)."""
    full = rounded(full)
    write_json(report_path, full)
    write_json(metrics_path, headline(full, keys))


def open_sqlite(path: Path) -> sqlite3.Connection:
    """A stage's persistent request cache: WAL with synchronous=FULL, so a committed row survives `kill -9` and a
    power cut, and a rerun repeats no request that was paid for; usable from the stage's worker threads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
