"""What a person at the terminal sees of a run (`qrb demo`, `qrb run`), and where everything else goes.

The console shows one line per step as it ends (name, what it did, seconds), the progress of long work (a bar that
has run for `LONG_S`: one updating line on a terminal; otherwise a line when a bar passes a 20% step, at most one
every `GAP_S` per stage (evaluate runs dozens of one-minute bars), so a log file of the console
stays readable), a failure's cause in one line, and the command's summary. Everything else (each stage's whole
output, DVC's and Prefect's messages, library warnings) goes to the Prefect run's logs (the UI) and to a log file
that the command names at its start and end.

A step's "what it did" is the stage's own last summary line: the last INFO line a `stages.*` logger wrote, in the
format of `qrb.io.LOG_FORMAT`. It is shown, never interpreted (failures are read from the status file, see
flows/pipeline.py).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from qrb.io import LOG_FORMAT

CONSOLE = "qrb_console"  # a log record with this attribute set also goes to the console
SUMMARY = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO stages\.[\w.]+: (?P<msg>.+)$")
BAR = re.compile(r"(?:(?P<desc>[^|]*?):\s*)?(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*"
                 r"\[(?P<elapsed>[\d:]+)(?:<(?P<left>[\d:?]+))?")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # e.g. tqdm's cursor-up between nested bars
LONG_S = 5  # a bar shows once its work has taken this long: data maps and short eval passes never do
STEPS = (20, 40, 60, 80)  # off a terminal, a bar's progress is one line at each of these percentages,
GAP_S = 120.0  # ... and a stage's progress lines are this far apart at least
WIDTH = 110  # a step's line is cut here (the whole line is in the log)

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


def clean(line: str) -> str:
    """A line of a child's output without terminal control sequences."""
    return ESCAPES.sub("", line).strip()


def clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def seconds(clock: str) -> int:
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total


class StageOutput:
    """What one stage's output means to the console: its progress bars and its own summary line."""

    def __init__(self, stage: str):
        self.stage, self.summary = stage, ""
        self.marks: dict[tuple[str, str], int] = {}
        self.shown_at = -GAP_S

    def feed(self, line: str) -> None:
        m = SUMMARY.match(line)
        if m:
            msg = m["msg"]
            self.summary = msg[len(self.stage) + 2:] if msg.startswith(f"{self.stage}: ") else msg
            return
        bar = BAR.search(line)
        if bar and _console is not None and seconds(bar["elapsed"]) >= LONG_S:
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


class Console:
    """The terminal (or whatever stderr is): lines, and on a terminal one progress line rewritten in place."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.tty = stream.isatty()
        self.pending = False
        self.last_update = 0.0

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


class ConsoleHandler(logging.Handler):
    """Only records marked for the console, as plain lines."""

    def __init__(self, console: Console):
        super().__init__(logging.INFO)
        self.console = console
        self.addFilter(lambda record: getattr(record, CONSOLE, False))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            self.console.line(text if getattr(record, CONSOLE) == "whole" else clip(text))
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
    """For the block: the console shows only what `say` marks (and progress); every record of INFO and above, and
    warnings, go to `log_file` (overwritten). Prefect's console handlers are detached and put back afterwards, unless
    `restore` is false (a command that ends with the block: what Prefect logs at exit, stopping its temporary server,
    then goes to the log file too)."""
    global _console
    path = Path(log_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
    detached = _console_handlers()
    root = logging.getLogger()
    old_level = root.level
    console = Console(sys.stderr)
    handler = ConsoleHandler(console)
    for lg, h in detached:
        lg.removeHandler(h)
        if lg is not root and not lg.propagate:  # e.g. prefect._internal, uvicorn: their records still get logged
            lg.addHandler(file_handler)
    root.addHandler(file_handler)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # Prefect's client logs each request it sends (its logs to the API among them) at INFO: not a detail of the run
    chatty = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in chatty:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)
    _console = console
    try:
        yield path
    finally:
        _console = None
        root.removeHandler(handler)
        if restore:
            logging.captureWarnings(False)
            root.setLevel(old_level)
            for name, level in chatty.items():
                logging.getLogger(name).setLevel(level)
            for lg in {lg for lg, _ in detached} | {root}:
                if file_handler in lg.handlers:
                    lg.removeHandler(file_handler)
            for lg, h in detached:
                lg.addHandler(h)
            file_handler.close()
