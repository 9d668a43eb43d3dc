"""The opening and closing every stage's `main()` shares: arguments, logging, params, the offline switch, and the
one error path (a `QrbError` or `ValueError` becomes one line on stderr and an exit code; see `qrb.errors`).
`--help` prints the stage's docstring and exits 0; an unknown argument exits 2 (argparse). When the environment names
a status file (`QRB_STATUS_FILE`, set by the Prefect flow), the outcome is also written there as JSON
`{stage, exit_code, kind, message}`, so an orchestrator decides retries by the kind, not by matching message text.
Every outcome of the stage's own code is written, a crash (an unexpected exception, still raised with its traceback)
and a usage error included, so no status file means the command never ran.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qrb.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, QrbError, kind_of_exit
from qrb.io import setup_logging
from qrb.params import load_params

log = logging.getLogger(__name__)

STATUS_ENV = "QRB_STATUS_FILE"


class StageParser(argparse.ArgumentParser):
    """The stage's arguments: its docstring is the help; a usage error is also reported in the status file."""

    def __init__(self, doc: str | None, section: str) -> None:
        head, _, rest = (doc or "").strip().partition("\n\n")
        super().__init__(prog=f"python -m stages.{section}", description=head, epilog=rest or None,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.section = section

    def error(self, message: str):  # type: ignore[override]
        write_status(self.section, EXIT_USAGE, message)
        super().error(message)


def write_status(section: str, exit_code: int, message: str = "") -> None:
    path = os.environ.get(STATUS_ENV)
    if not path:
        return
    try:
        Path(path).write_text(json.dumps({"stage": section, "exit_code": exit_code, "kind": kind_of_exit(exit_code)
                                          if exit_code else "ok", "message": message}) + "\n")
    except OSError as e:  # the report must never change the stage's own outcome
        log.warning("%s: could not write the status file %s: %s", section, path, e)


def fail(section: str, e: BaseException) -> None:
    """One line, once: `<stage>: <message>` on stderr, then exit with the error's code."""
    code = e.exit_code if isinstance(e, QrbError) else EXIT_FAILED
    message = " ".join(str(e).split()) or type(e).__name__
    write_status(section, code, message)
    print(f"{section}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def set_hf_offline(offline: bool) -> None:
    """With base.hf_offline the hub is never contacted (before transformers is imported)."""
    if offline:
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def load_section(section: str, params_cls: type, base_keys: Iterable[str] = (),
                 path: str | Path = "params.yaml") -> tuple[dict[str, Any], Any]:
    """`qrb.params.load_params`, a bad params.yaml as a ConfigError."""
    try:
        return load_params(section, params_cls, base_keys, path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


THREADS_ENV = "QRB_CPU_THREADS"


def cpu_threads() -> int:
    """Torch threads for this process: `$QRB_CPU_THREADS`, else the cores this process may use (its CPU affinity)
    minus those other work keeps busy now (`busy_cores`: /proc/stat over 0.3 s), rounded, at least 1. Why: on 2
    cores 2 threads train SmolLM2 faster than 1 when idle but about half as fast beside other work (BENCHMARKS.md,
    threads per process)."""
    if os.environ.get(THREADS_ENV, "").strip():
        try:
            return max(1, int(os.environ[THREADS_ENV]))
        except ValueError:
            raise ConfigError(f"{THREADS_ENV} must be a whole number of threads, got {os.environ[THREADS_ENV]!r}") \
                from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - busy_cores(cores))))


def busy_cores(cores: int, window_s: float = 0.3) -> float:
    """How many cores other work keeps busy right now: /proc/stat sampled over `window_s` (the 1-minute load average
    would still count the previous stage for a minute after it ended); the load average where there is no /proc."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
        return cores * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def set_cpu_threads(n: int | None = None) -> int:
    """Apply `cpu_threads()` (before torch starts its pools; OMP_NUM_THREADS set by the user wins)."""
    n = n or cpu_threads()
    if "OMP_NUM_THREADS" in os.environ and THREADS_ENV not in os.environ:
        return int(os.environ["OMP_NUM_THREADS"] or n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


def run_stage(doc: str | None, section: str, params_cls: type, base_keys: Iterable[str],
              body: Callable[[dict[str, Any], Any, argparse.Namespace], None], argv: list[str] | None = None,
              add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    ap = StageParser(doc, section)
    if add_arguments is not None:
        add_arguments(ap)
    args = ap.parse_args(argv)
    setup_logging()
    try:
        log.debug("%s: %d torch thread(s)", section, set_cpu_threads())
        base, p = load_section(section, params_cls, base_keys)
        if "hf_offline" in base:
            set_hf_offline(base["hf_offline"])
        body(base, p, args)
    except (QrbError, ValueError) as e:
        fail(section, e)
    except Exception as e:  # a bug: the traceback stays Python's, the status says it was no transient failure
        write_status(section, EXIT_FAILED, f"{type(e).__name__}: {' '.join(str(e).split())}")
        raise
    write_status(section, 0)
