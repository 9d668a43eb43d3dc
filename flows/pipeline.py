"""Prefect flow: the DVC pipeline, one task per stage (`dvc --wait-for-lock repro <stage>`), connected as the DVC DAG.

    qrb run [--workspace DIR] [-S train.lora.r=4 ...] [--until validate] [--force scrape]

DVC decides what is stale. Overrides are checked, then written into params.yaml (flows/overrides.py), so each stage
stays its own task. A failure is read from the status file its stage writes (`qrb.stage`), never from its output;
only a transient one of a network stage is retried. Runs, retries, artifacts, the console: docs/orchestration.md.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from flows import console
from flows import overrides as ov
from flows.artifacts import StageProgress, publish_artifacts
from flows.workspace import dvc, dvc_stages, paths, venv_env
from qrb.errors import EXIT_FAILED, EXIT_USAGE, ConfigError, QrbError, kind_of_exit
from qrb.params import parse_set
from qrb.stage import STATUS_ENV

NETWORK_STAGES = {"scrape": 3, "generate": 3}  # stage -> retries of transient failures; other stages: none
# the coarse second line behind the stages' own per-request backoff; one delay (Prefect's UI shows a list as "NaN s")
RETRY_DELAY_S = 30.0
RETRY_JITTER = 0.5
STAGE_TIMEOUT_S = 6 * 3600
# a tqdm bar (too chatty for logs: its final state is kept) and whatever was written after it on the same line
PROGRESS_BAR = re.compile(r"^(?P<bar>.*?\d{1,3}%\|[^|]*\|[^\[]*\[[^\]]*\])(?P<rest>.*)$")


def stage_order(workspace: Path) -> list[str]:
    """The stages as dvc.yaml lists them (dvc.yaml is written in dependency order)."""
    path = workspace / "dvc.yaml"
    if not path.is_file():
        raise ConfigError(f"no pipeline at {workspace} (no dvc.yaml): make a workspace with "
                          f"`qrb workspace {workspace} --profile tiny`, or pass --workspace . from the repo root")
    stages = dvc_stages(workspace)
    if not stages:
        raise ConfigError(f"{path} defines no stages")
    return list(stages)


def stage_edges(workspace: Path) -> dict[str, list[str]]:
    """stage -> the stages whose outputs (or a folder above or below one) it depends on: the edges of `dvc dag`."""
    stages = dvc_stages(workspace)
    outs = {name: [p.rstrip("/") for kind in ("outs", "metrics", "plots") for p in paths((spec or {}).get(kind))]
            for name, spec in stages.items()}

    def overlap(a: str, b: str) -> bool:
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    return {name: [up for up in stages if up != name
                   and any(overlap(d.rstrip("/"), o) for d in paths((spec or {}).get("deps")) for o in outs[up])]
            for name, spec in stages.items()}


def plan(workspace: Path, until: str | None = None, force: list[str] | None = None) -> list[str]:
    """The stages to run (up to `until`); an unknown stage name is a ConfigError naming the valid ones."""
    order = stage_order(workspace)
    for name in [*(force or []), *([until] if until else [])]:
        if name not in order:
            close = difflib.get_close_matches(name, order, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown stage {name!r}{hint}; dvc.yaml has: {', '.join(order)}")
    return order[:order.index(until) + 1] if until else order


class StageFailed(RuntimeError):
    """A stage (or experiment) failed; `kind`: what its status file says (`qrb.errors`), "dvc" (none) or "timeout"."""

    def __init__(self, what: str, kind: str, exit_code: int | None, cause: str = "", details: Any = ()):
        self.what, self.kind, self.exit_code, self.cause, self.details = what, kind, exit_code, cause, list(details)
        self.why = ", ".join([kind, *([f"exit {exit_code}"] if exit_code is not None else []),
                              *([] if self.retryable else ["not retried"])])
        self.headline = f"{what} failed ({self.why})" + (f": {cause}" if cause else "")
        super().__init__("\n".join([self.headline, *self.details]))

    def __reduce__(self):  # Prefect may pickle a failed task's exception (persisted results, another process)
        return type(self), (self.what, self.kind, self.exit_code, self.cause, self.details)

    @property
    def retryable(self) -> bool:
        return self.kind == "transient"


def read_status(path: Path) -> dict[str, Any] | None:
    """The outcome a stage wrote (`qrb.stage.run_stage`), or None when its command never ran."""
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):  # none, or half-written (the stage was killed while writing): nothing reported
        return None
    return status if isinstance(status, dict) else None


def stage_failure(what: str, rc: int, status: dict[str, Any] | None, tail: list[str]) -> StageFailed:
    """Why `what` ("stage train", "experiment x") exited `rc`, from its stage's status (DVC exits 255 whatever)."""
    code = status.get("exit_code") if status else None
    if isinstance(code, int) and code != 0:
        stage, message = status.get("stage", ""), status.get("message", "")
        cause = message if what == f"stage {stage}" else f"{stage}: {message}"
        return StageFailed(what, kind_of_exit(code), code, cause, tail[-15:])
    # DVC's own last line says why; it is shown, not interpreted
    ran = "its command did not run" if status is None else "after its command succeeded"
    return StageFailed(what, "dvc", rc, f"DVC failed, {ran}" + (f": {tail[-1]}" if tail else ""), tail[-15:])


def stream(cmd: list[str], workspace: str | Path, timeout_s: float, logger: Any,
           env: dict[str, str] | None = None, output: console.StageOutput | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, each line to `logger` (a bar: its 100% line; a repeated warning: once) and to `output`; returns
    (exit code, last lines). A watchdog kills it after `timeout_s` (a task's timeout can't stop a blocking read)."""
    tail: list[str] = []
    finished: tuple[str | None, str] | None = None
    warned: set[str] = set()
    repeats = 0
    proc = subprocess.Popen(cmd, cwd=workspace, env=venv_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)  # text mode: tqdm's \r updates arrive as lines
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = console.ESCAPES.sub("", raw).strip()  # no terminal control sequences
            if output is not None:
                output.feed(line)
            m = PROGRESS_BAR.match(line)
            if m:
                done = console.BAR.search(m["bar"])
                if done and done["pct"] == "100" and done.group("desc", "total") != finished:
                    logger.info(m["bar"])  # tqdm may draw 100% twice (the last update, then at close): once
                    finished = done.group("desc", "total")
                line = m["rest"].strip()
                if not line:
                    continue
            if "Warning: " in line or line.startswith("warnings.warn("):
                if line in warned:  # the same warning from a loop (peft at every checkpoint)
                    repeats += 1
                    continue
                warned.add(line)
            if line:
                logger.info(line)
                tail = (tail + [line])[-40:]
        if repeats:
            logger.info("(%d repeated warning lines not shown again)", repeats)
        rc = proc.wait()
    finally:
        timed_out = timer.finished.is_set()  # set before cancel() only if the watchdog fired
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    if timed_out:  # a stage's network calls have their own timeouts: this one is a hang, not a blip
        raise StageFailed(f"`{' '.join(cmd[2:])}`", "timeout", None, f"killed after {timeout_s:.0f} s")
    return rc, tail


def run_reported(cmd: list[str], workspace: str | Path, timeout_s: float, logger: Any,
                 output: console.StageOutput | None = None) -> tuple[int, list[str], dict[str, Any] | None]:
    """`stream(cmd)` with a fresh status file for the stages it runs; returns (exit code, last lines, status)."""
    with tempfile.TemporaryDirectory(prefix="qrb-status-") as tmp:
        path = Path(tmp) / "status.json"
        rc, tail = stream(cmd, workspace, timeout_s, logger, env={STATUS_ENV: str(path)}, output=output)
        return rc, tail, read_status(path)


def _retry_note(failure: StageFailed) -> str:
    """", retrying" when Prefect will run this task again (a transient failure with retries left)."""
    ctx = TaskRunContext.get()
    if not failure.retryable or ctx is None:
        return ""
    left = ctx.task.retries - (ctx.task_run.run_count - 1)
    return f"; retrying ({left} {'retry' if left == 1 else 'retries'} left)" if left > 0 else ""


@task(task_run_name="{stage}", log_prints=True)
def repro_stage(stage: str, workspace: str, timeout_s: float = STAGE_TIMEOUT_S, force: bool = False) -> dict[str, Any]:
    """`dvc repro <stage>` (`--force --single-item` when forced); `ran`: its command ran (it reported an outcome)."""
    logger = get_run_logger()
    args = ["--wait-for-lock", "repro", *(["--force", "--single-item"] if force else []), stage]
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    progress = StageProgress(stage)
    output = console.StageOutput(stage, on_progress=progress)
    t0 = time.time()
    try:
        rc, tail, status = run_reported(dvc(*args), workspace, timeout_s, logger, output)
        if rc != 0:
            raise stage_failure(f"stage {stage}", rc, status, tail)
    except StageFailed as failure:
        console.say(logger, "  %-10s %5.0f s  FAILED (%s): %s%s", stage, time.time() - t0, failure.why,
                    failure.cause, _retry_note(failure))
        raise
    wall = time.time() - t0
    ran = status is not None
    if progress.id is not None:
        progress(None, done=f"done in {wall:.0f} s")
    console.say(logger, "  %-10s %5.0f s  %s", stage, wall, (output.summary or "ran") if ran else "up to date")
    return {"stage": stage, "wall_s": round(wall, 2), "ran": ran}


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only a failure its stage reported as transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result: nothing says a retry can help
            return False
    return isinstance(exc, StageFailed) and exc.retryable


@task(name="set-params", task_run_name="set-params")
def set_params(workspace: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Check the overrides (nothing written when one is bad), then write them into params.yaml."""
    ov.check(workspace, overrides)
    changes = ov.apply(Path(workspace) / "params.yaml", overrides)
    logger = get_run_logger()
    for key, (old, new) in changes.items():
        logger.info("params: %s: %r -> %r", key, old, new)
    return {k: v[1] for k, v in changes.items()}


@flow(name="qrb-pipeline", log_prints=True)
def pipeline(workspace: str = ".", params: dict[str, Any] | None = None, until: str | None = None,
             force: list[str] | None = None, retries: dict[str, int] | None = None,
             retry_delay_s: float = RETRY_DELAY_S, stage_timeout_s: float = STAGE_TIMEOUT_S) -> list[dict[str, Any]]:
    """The stages of dvc.yaml up to `until`, after writing `params` (dotted keys, as `dvc exp run -S`); `force`: stages
    re-run even when unchanged; `retries`: stage -> retries of transient failures. Artifacts published at the end."""
    ws = Path(workspace).resolve()
    results: list[dict[str, Any]] = []
    error = None
    try:
        order = plan(ws, until, force)
        edges = stage_edges(ws)
        states: dict[str, Any] = {}
        first: list[Any] = []  # what the stages with no upstream stage wait for: the params they read
        if params:
            first = [set_params(str(ws), params, return_state=True)]
            first[0].result()  # a bad override: the run fails here, nothing written
        for stage in order:
            wait = [states[up] for up in edges.get(stage, []) if up in states] or first
            retried = repro_stage.with_options(
                retries=(NETWORK_STAGES if retries is None else retries).get(stage, 0),
                retry_delay_seconds=retry_delay_s, retry_jitter_factor=RETRY_JITTER, retry_condition_fn=retry_transient)
            states[stage] = retried(stage, str(ws), timeout_s=stage_timeout_s, force=stage in (force or []),
                                    wait_for=wait, return_state=True)
            results.append(states[stage].result())
    except Exception as e:
        error = e.headline if isinstance(e, StageFailed) else str(e)
        raise
    finally:
        try:
            publish_artifacts(str(ws), results, error)
        except Exception as e:  # noqa: BLE001 - a report must not hide the stage's own failure
            get_run_logger().warning("could not publish artifacts: %s", e)
    return results


def exit_code(e: BaseException) -> int:
    """The exit code a failed run ends with: the failed stage's own (78 config, 65 data, 75 transient)."""
    if isinstance(e, StageFailed) and isinstance(e.exit_code, int) and 0 < e.exit_code < 255:
        return e.exit_code
    return e.exit_code if isinstance(e, QrbError) else EXIT_FAILED


def headline(e: BaseException) -> str:
    """A failed run in one line; a full disk (a stage's, DVC's or git's write) also says what to do about it."""
    message = getattr(e, "headline", None) or " ".join(str(e).split())
    if os.strerror(errno.ENOSPC).lower() in message.lower():  # an OSError's text, DVC's and git's all carry it
        message += "; free some disk space and run it again (the stages that finished are kept)"
    return message


def fail(prog: str, e: BaseException, code: int | None = None) -> None:
    """One line on stderr, then exit."""
    print(f"{prog}: {headline(e)}", file=sys.stderr, flush=True)
    sys.exit(exit_code(e) if code is None else code)


def check_args(workspace: Path, until: str | None, force: list[str], set_param: list[str]) -> dict[str, Any]:
    """Before Prefect starts: the workspace and stage names (exit 2), the overrides (exit 78); returns the overrides."""
    try:
        plan(workspace, until, force)
        overrides = parse_set(set_param)
    except (ConfigError, ValueError) as e:  # parse_set: not key=value
        fail("qrb run", e, EXIT_USAGE)
    try:
        if overrides:
            ov.check(workspace, overrides)
    except ConfigError as e:
        fail("qrb run", e)
    return overrides


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the DVC pipeline of a workspace through Prefect")
    ap.add_argument("--workspace", default=".", help="the workspace (a folder with dvc.yaml and params.yaml; default .)")
    ap.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                    help="param override, as `dvc exp run -S` (repeatable), e.g. -S train.lora.r=4")
    ap.add_argument("--until", metavar="STAGE", help="stop after this stage")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if unchanged")
    ap.add_argument("--json", action="store_true", help="print the stages' results as JSON at the end")
    args = ap.parse_args(argv)
    ws = Path(args.workspace)
    overrides = check_args(ws, args.until, args.force, args.set_param)
    log = ws / "logs" / "run.log"
    t0 = time.time()
    with console.quiet(log, restore=False):
        console.line(f"qrb run: {ws.resolve()}; details in {log}")
        try:
            results = pipeline(str(ws), params=overrides or None, until=args.until, force=args.force or None)
        except Exception as e:  # noqa: BLE001 - its cause in one line; the traceback is in the log
            console.line(f"details in {log}")
            fail("qrb run", e)
        console.line(f"qrb run: done in {time.time() - t0:.0f} s; details in {log}")
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()


if __name__ == "__main__":
    main()
