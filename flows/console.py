"""What a person at the terminal sees of a run (`qrb demo`, `qrb run`): one line per step (the stage's own last summary
line, shown, never interpreted), the progress of long work, a failure's cause in one line and the end-of-run screen
(`results`). Everything else goes to the Prefect run's logs and a log file the command names (`quiet`)."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from qrb.io import LOG_FORMAT, read_jsonl

CONSOLE = "qrb_console"  # a log record with this attribute set also goes to the console
SUMMARY = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO stages\.[\w.]+: (?P<msg>.+)$")
BAR = re.compile(r"(?:(?P<desc>[^|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
                 r"\[(?P<elapsed>[\d:]+)(?:<(?P<left>[\d:?]+))?")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # e.g. tqdm's cursor-up between nested bars
LONG_S = 5  # a bar shows once its work has taken this long: data maps and short eval passes never do
STEPS = (20, 40, 60, 80)  # off a terminal, a bar's progress is one line at each of these percentages,
GAP_S = 120.0  # ... at least this far apart per stage (evaluate runs dozens of one-minute bars)
WIDTH = 100  # a step's line is cut here (the whole line is in the log)
SCREEN = 100  # the end-of-run screen's width
LONG_DECIMAL = re.compile(r"(?<![\w.])\d+\.\d{5,}(?:e-?\d+)?")  # 3.786388315473284: shown as 3.786
GRADES = (("correct", "correct"), ("incorrect", "incorrect"), ("not attempted", "not_attempted"))  # "–": none
MODEL_NAMES = {"base": "base", "fine_tuned": "fine-tuned", "rag": "RAG", "fine_tuned_rag": "fine-tuned + RAG"}
SETS = ("golden", "seen", "eval", "invented")  # the screen's order (the report's keys are sorted)
MAX_ROWS = 16  # set x model rows on the screen (4 x 4 in the demo); more: the rivals' rows stay in the reports

_console: Console | None = None


def say(logger: Any, msg: str, *args: Any) -> None:
    """Log `msg` (to the run's logs and the log file) and show it on the console."""
    logger.info(msg, *args, extra={CONSOLE: True})


def line(text: str) -> None:
    """A line of the command itself (not of a task): to the console, and to the log file while `quiet`."""
    if _console is None:
        print(text, file=sys.stderr, flush=True)
    else:
        logging.getLogger(__name__).info(text, extra={CONSOLE: "whole"})  # not clipped: it names paths


def clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def seconds(clock: str) -> int:
    return sum(int(part) * 60 ** i for i, part in enumerate(reversed(clock.split(":"))))


class StageOutput:
    """What one stage's output means to the console: its progress bars and its own summary line."""

    def __init__(self, stage: str, on_progress: Any = None):
        self.stage, self.summary, self.on_progress = stage, "", on_progress  # on_progress(bar match): e.g. Prefect's
        self.marks: dict[tuple[str, str], int] = {}
        self.shown_at = -GAP_S

    def feed(self, line: str) -> None:
        m = SUMMARY.match(line)
        if m:
            self.summary = LONG_DECIMAL.sub(lambda d: f"{float(d[0]):.4g}", m["msg"].removeprefix(f"{self.stage}: "))
            return
        bar = BAR.search(line)
        if bar and seconds(bar["elapsed"]) >= LONG_S:
            if self.on_progress is not None:
                self.on_progress(bar)
            if _console is not None:
                self.progress(bar)

    def progress(self, bar: re.Match) -> None:
        assert _console is not None
        pct, desc = int(bar["pct"]), (bar["desc"] or "").strip()
        text = (f"  {self.stage:<10} {desc + ' ' if desc else ''}{pct:>3}%  {bar['n']}/{bar['total']}  "
                f"{bar['elapsed']} elapsed" + (f", ~{bar['left']} left" if bar["left"] not in (None, "?") else ""))
        if _console.tty:
            _console.update(text)
            return
        key = (desc, bar["total"])
        step = max([s for s in STEPS if pct >= s] or [0])
        now = time.monotonic()
        if step > self.marks.get(key, 0) and pct < 100 and now - self.shown_at >= GAP_S:
            self.marks[key] = step
            self.shown_at = now
            _console.line(text)


class Console(logging.Handler):
    """The terminal (or whatever stderr is): lines, and on a terminal one progress line rewritten in place; as a log
    handler, only the records marked for the console, as plain lines."""

    def __init__(self, stream: TextIO):
        super().__init__(logging.INFO)
        self.stream, self.tty, self.pending, self.last_update = stream, stream.isatty(), False, 0.0
        self.addFilter(lambda record: getattr(record, CONSOLE, False))

    def update(self, text: str) -> None:
        now = time.monotonic()
        if now - self.last_update < 0.5:
            return
        self.last_update = now
        cols = shutil.get_terminal_size((WIDTH, 20)).columns - 1
        self.stream.write("\r" + text[:cols] + "\x1b[K")
        self.stream.flush()
        self.pending = True

    def line(self, text: str) -> None:
        if self.pending:
            self.stream.write("\r\x1b[K")
            self.pending = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            self.line(text if getattr(record, CONSOLE) == "whole" else clip(text))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [(lg, h) for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and getattr(h, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)]


@contextlib.contextmanager
def quiet(log_file: str | Path, restore: bool = True) -> Iterator[Path]:
    """For the block: the console shows only what `say` marks (and progress); INFO and up, and warnings, go to
    `log_file`. Prefect's console handlers come back afterwards unless not `restore` (a command that ends with the
    block: what Prefect logs at exit then goes to the log file too)."""
    global _console
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    handler = Console(sys.stderr)
    undo = contextlib.ExitStack()  # what `restore` puts back, last change first
    # closing the log on a full disk loses its last buffered lines: the run's own error says why
    undo.enter_context(contextlib.suppress(OSError))
    undo.callback(file_handler.close)
    for lg, h in _console_handlers():
        lg.removeHandler(h)
        undo.callback(lg.addHandler, h)
        if lg is not root and not lg.propagate:  # e.g. prefect._internal, uvicorn: their records still get logged
            lg.addHandler(file_handler)
            undo.callback(lg.removeHandler, file_handler)
    root.addHandler(file_handler)
    undo.callback(root.removeHandler, file_handler)
    root.addHandler(handler)
    undo.callback(root.setLevel, root.level)
    root.setLevel(logging.INFO)
    # Prefect's client logs each request it sends (its logs to the API among them) at INFO: not a detail of the run
    for chatty in map(logging.getLogger, ("httpx", "httpcore")):
        undo.callback(chatty.setLevel, chatty.level)
        chatty.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    undo.callback(logging.captureWarnings, False)
    # a full disk fails the log file's writes: reporting each on stderr, which Prefect's log_prints turns back into
    # a log record, recursed until Python gave up; the run's own error says what failed
    undo.callback(setattr, logging, "raiseExceptions", logging.raiseExceptions)
    logging.raiseExceptions = False
    _console = handler
    try:
        yield path
    finally:
        _console = None
        root.removeHandler(handler)
        if restore:
            undo.close()


def _cell(m: dict[str, Any], key: str) -> str:
    """54% [44, 63]: a rate and its 95% interval in percent (no interval below the set's minimum n)."""
    v, ci = m.get(key), m.get(f"{key}_ci95")
    if not isinstance(v, (int, float)):
        return "–"
    return f"{100 * v:.0f}%" + (f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]" if isinstance(ci, list) else "")


def _name(model: str) -> str:
    return MODEL_NAMES.get(model, model.removeprefix("rival_"))


def _changed(sets: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """(the question set, one sentence on what fine-tuning changed there against base) for the screen."""
    graded = [s for s, by in sets.items() if isinstance(by.get("fine_tuned", {}).get("correct"), (int, float))
              and "base" in by]  # a report without grades (or a set without questions): the dashes say enough
    if not graded:
        return None, ""
    name = "seen" if "seen" in graded else graded[0]  # the seen set: what fine-tuning can teach
    ft, base = sets[name]["fine_tuned"], sets[name]["base"]
    text = f"Fine-tuned is correct on {_cell(ft, 'correct')} of {name} questions vs base {_cell(base, 'correct')}"
    gain, gci = ft.get("correct_gain"), ft.get("correct_gain_ci95")
    if isinstance(gain, (int, float)):
        text += f" (paired gain {100 * gain:+.0f} points" + (
            f" [{100 * gci[0]:+.0f}, {100 * gci[1]:+.0f}])" if isinstance(gci, list) else ")")
    inv = sets.get("invented", {})
    if {"base", "fine_tuned"} <= set(inv):
        text += (f"; it declines {_cell(inv['fine_tuned'], 'not_attempted')} of questions about invented papers "
                 f"(base {_cell(inv['base'], 'not_attempted')})")
    return name, text + "."


def _example(predictions: Path, set_name: str) -> list[str]:
    """One question of `set_name` answered by base and fine-tuned side by side: one only fine-tuned got right, else
    the first."""
    pairs: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in read_jsonl(predictions) if predictions.exists() else []:
        if r.get("set") == set_name and r.get("model") in ("base", "fine_tuned"):
            pairs.setdefault((r.get("id"), r["question"]), {})[r["model"]] = r
    both = [p for p in pairs.values() if len(p) == 2]
    if not both:
        return []
    pick = next((p for p in both if p["fine_tuned"].get("grade") == "correct" != p["base"].get("grade")), None)
    why = "one fine-tuned got right and base did not" if pick else "the first question"
    pick = pick or both[0]
    gold = pick["base"].get("short_answer") or pick["base"].get("reference") or ""
    half = (SCREEN - 4) // 2

    def column(text: str) -> list[str]:
        lines = textwrap.wrap(" ".join(str(text).split()) or "(empty)", half) or [""]
        return lines[:1] + ([clip(" ".join(lines[1:]), half)] if len(lines) > 1 else [])

    out = textwrap.wrap(f"Example ({set_name}, {why}): {pick['base']['question']}", SCREEN)[:2]
    out += [clip(f"  gold: {gold}", SCREEN), f"  {'base':<{half}}  fine-tuned"]
    out += [f"  {a:<{half}}  {b}".rstrip() for a, b in itertools.zip_longest(
        column(pick["base"].get("prediction", "")), column(pick["fine_tuned"].get("prediction", "")), fillvalue="")]
    return out


def results(workspace: str | Path) -> list[str]:
    """The end of a run (~30 lines of `SCREEN` columns): each set's grades per model with 95% intervals ("–": none),
    what fine-tuning changed in one sentence, and one question answered by base and fine-tuned (every table stays in
    reports/)."""
    ws = Path(workspace)
    report = ws / "reports" / "evaluate.json"
    if not report.exists():
        return ["No evaluation (reports/evaluate.json is missing)."]
    rank = {name: i for i, name in enumerate([*SETS, *MODEL_NAMES])}
    sets = {s: dict(sorted(by.items(), key=lambda kv: rank.get(kv[0], 99)))
            for s, by in sorted(json.loads(report.read_text()).items(), key=lambda kv: rank.get(kv[0], 99))
            if by and not s.endswith(("_after_cutoff", "_before_cutoff"))}
    lines = [f"{'questions':<16}{'model':<18}" + "".join(f"{title:<17}" for title, _ in GRADES).rstrip()]
    rows = [(s, model, m) for s, by in sets.items() for model, m in by.items()]
    shown = rows if len(rows) <= MAX_ROWS else [r for r in rows if r[1] in MODEL_NAMES][:MAX_ROWS]
    for i, (s, model, m) in enumerate(shown):
        label = f"{s} (n={m.get('n', '?')})" if i == 0 or shown[i - 1][0] != s else ""
        lines.append(f"{label:<16}{_name(model):<18}" + "".join(f"{_cell(m, key):<17}" for _, key in GRADES).rstrip())
    more = f" ({len(rows) - len(shown)} more rows)" if len(rows) > len(shown) else ""
    lines.append(f"[lo, hi]: 95% interval (none for small sets); all metrics in reports/eval_table.md{more}")
    name, sentence = _changed(sets)
    if sentence:
        lines += ["", *textwrap.wrap(sentence, SCREEN)]
    if name:
        example = _example(ws / "artifacts" / "evaluate" / "predictions.jsonl", name)
        lines += [""] + example if example else []
    return lines
