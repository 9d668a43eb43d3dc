"""Prefect flow: the DVC pipeline, one task per stage, in the order dvc.yaml defines.

    python -m flows.pipeline [--workspace DIR] [-S train.lora.r=4 ...] [--until validate] [--force scrape]
    (also `qrb run ...`)

DVC decides what is stale (a task for an up-to-date stage finishes at once); Prefect runs, retries the stages that
touch the network (scrape, generate) with exponential backoff, and shows every run in its UI (`prefect server
start`, then http://127.0.0.1:4200; without a server a temporary local one is used). Flows only wire: each task
runs `dvc --wait-for-lock repro <stage>` and streams its output into the Prefect logs.

Param overrides (`-S key=value`, the flow parameter `params`) follow `dvc exp run -S`: dotted keys, values read as
YAML. They are written into the workspace's params.yaml (comments kept) before the stages run, so each stage stays
its own task (`dvc exp run` would run the whole DAG in one process) and the workspace's params.yaml, dvc.lock and
outputs agree afterwards (`dvc params diff` / `dvc metrics diff` show the change). Unlike `-S`, a key that params.yaml
lacks is an error (a typo must not silently add a key).

Failures are classified by what the stage reports, never by its output text: each run of a stage gets a fresh status
file (`QRB_STATUS_FILE`), where `qrb.stage.run_stage` writes its exit code, kind and one-line message (DVC itself
exits 255 whatever the command did). Only a transient failure (exit 75: the network, an endpoint) of a network stage
is retried; config (78), data (65, the validate gate), a crash (1) and a failure with no status (DVC failed before
the command ran) are not; the local stages have no retries at all. The stage's message is the cause shown in the
task's state and in the artifacts, which each run publishes, also when a stage failed (see flows/artifacts.py).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from flows.artifacts import publish_artifacts
from flows.workspace import dvc, venv_env
from qrb.errors import kind_of_exit
from qrb.params import parse_set
from qrb.stage import STATUS_ENV

NETWORK_STAGES = {"scrape": 3, "generate": 3}  # stage -> retries of transient failures; other stages: none
RETRY_BACKOFF_S = 10.0  # first retry after ~10 s, then 20 s, 40 s (± jitter)
STAGE_TIMEOUT_S = 6 * 3600
PROGRESS_BAR = re.compile(r"\d+%\|.*\]\s*$|\[A\s*$")  # tqdm lines: too chatty for logs (the last one is kept)


def stage_order(workspace: Path) -> list[str]:
    """The stages as dvc.yaml lists them (dvc.yaml is written in dependency order)."""
    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages") or {}
    if not stages:
        raise SystemExit(f"{workspace / 'dvc.yaml'} defines no stages")
    return list(stages)


class StageFailed(RuntimeError):
    """A stage (or an experiment) failed. `kind` is what the stage reported in its status file (`qrb.errors`: config,
    data, transient, failed, usage), "dvc" when it reported nothing (DVC failed around its command), or "timeout".
    Only a transient failure is retried (and only for the stages given retries)."""

    def __init__(self, what: str, kind: str, exit_code: int | None, cause: str = "", details: Iterable[str] = ()):
        self.what, self.kind, self.exit_code, self.cause, self.details = what, kind, exit_code, cause, list(details)
        why = ", ".join([kind, *([f"exit {exit_code}"] if exit_code is not None else []),
                         *([] if self.retryable else ["not retried"])])
        self.headline = f"{what} failed ({why})" + (f": {cause}" if cause else "")
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
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # half-written (the stage was killed while writing): as if it reported nothing
        return None
    return status if isinstance(status, dict) else None


def stage_failure(what: str, rc: int, status: dict[str, Any] | None, tail: list[str]) -> StageFailed:
    """Why `what` ("stage train", "experiment lora-r4") exited `rc`, from the status its stage wrote, never from its
    output text (DVC exits 255 whatever the command's code was)."""
    code = status.get("exit_code") if status else None
    if isinstance(code, int) and code != 0:
        stage, message = status.get("stage", ""), status.get("message", "")
        cause = message if what == f"stage {stage}" else f"{stage}: {message}"
        return StageFailed(what, kind_of_exit(code), code, cause, tail[-15:])
    # DVC's own last line says why; it is shown, not interpreted
    ran = "its command did not run" if status is None else "after its command succeeded"
    return StageFailed(what, "dvc", rc, f"DVC failed, {ran}" + (f": {tail[-1]}" if tail else ""), tail[-15:])


def stream(cmd: list[str], workspace: str | Path, timeout_s: float, logger: Any,
           env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run `cmd`, each output line to `logger` (progress bars: their final state only); returns (exit code, last
    lines). A watchdog kills it after `timeout_s` (a sync task's timeout can't interrupt a blocking subprocess)."""
    tail: list[str] = []
    bar = ""
    proc = subprocess.Popen(cmd, cwd=workspace, env=venv_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if PROGRESS_BAR.search(line):
                bar = line if "100%|" in line else ""
                continue
            if bar:
                logger.info(bar)
                bar = ""
            if line:
                logger.info(line)
                tail = (tail + [line])[-40:]
        if bar:
            logger.info(bar)
        rc = proc.wait()
    finally:
        timed_out = timer.finished.is_set()  # set before cancel() only if the watchdog fired
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    if timed_out:  # a stage's network calls have their own timeouts: this one is a hang, not a blip
        raise StageFailed(f"`{' '.join(cmd[2:])}`", "timeout", None, f"killed after {timeout_s:.0f} s")
    return rc, tail


def run_reported(cmd: list[str], workspace: str | Path, timeout_s: float,
                 logger: Any) -> tuple[int, list[str], dict[str, Any] | None]:
    """`stream(cmd)` with a fresh status file for the stages it runs; returns (exit code, last lines, status)."""
    with tempfile.TemporaryDirectory(prefix="qrb-status-") as tmp:
        path = Path(tmp) / "status.json"
        rc, tail = stream(cmd, workspace, timeout_s, logger, env={STATUS_ENV: str(path)})
        return rc, tail, read_status(path)


@task(task_run_name="{stage}", log_prints=True)
def run_stage(stage: str, workspace: str, timeout_s: float = STAGE_TIMEOUT_S, force: bool = False) -> dict[str, Any]:
    """`dvc --wait-for-lock repro <stage>` (`--force --single-item` when forced); output streamed to the task's log.
    `ran`: the stage's command ran (it reported an outcome), i.e. DVC found it stale or was forced."""
    logger = get_run_logger()
    args = ["--wait-for-lock", "repro", *(["--force", "--single-item"] if force else []), stage]
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    t0 = time.time()
    rc, tail, status = run_reported(dvc(*args), workspace, timeout_s, logger)
    wall = time.time() - t0
    if rc != 0:
        raise stage_failure(f"stage {stage}", rc, status, tail)
    return {"stage": stage, "wall_s": round(wall, 2), "ran": status is not None}


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only a failure its stage reported as transient."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result: nothing says a retry can help
            return False
    return isinstance(exc, StageFailed) and exc.retryable


def stage_task(stage: str, retries: dict[str, int] | None = None, backoff_s: float = RETRY_BACKOFF_S):
    retries_n = (NETWORK_STAGES if retries is None else retries).get(stage, 0)
    if not retries_n:
        return run_stage
    return run_stage.with_options(retries=retries_n, retry_delay_seconds=exponential_backoff(backoff_factor=backoff_s),
                                  retry_jitter_factor=0.5, retry_condition_fn=retry_transient)


# --- param overrides (`dvc exp run -S` semantics) ------------------------------------------------------------------

def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Write dotted-key overrides into params.yaml, keeping its comments; returns {key: (old, new)} of changes.

    Raises ValueError naming the key when params.yaml lacks it (checked for every key before anything is written).
    """
    from ruamel.yaml import YAML

    rt = YAML(typ="rt")
    rt.width = 120
    data = rt.load(params_file.read_text())
    targets = []
    for key, value in overrides.items():
        node, parts = data, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                raise ValueError(f"params: unknown key `{'.'.join(parts[:i + 1])}` in override `{key}` "
                                 f"(not in {params_file.name})")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(f"params: unknown key `{key}` in override (not in {params_file.name})")
        targets.append((node, parts[-1], key, value))
    changes = {}
    for node, leaf, key, value in targets:
        if node[leaf] != value:
            changes[key] = (node[leaf], value)
            node[leaf] = value
    if changes:
        buf = io.StringIO()
        rt.dump(data, buf)
        params_file.write_text(buf.getvalue())
    return changes


@task(name="set-params")
def set_params(workspace: str, overrides: dict[str, Any]) -> dict[str, Any]:
    changes = apply_overrides(Path(workspace) / "params.yaml", overrides)
    logger = get_run_logger()
    for key, (old, new) in changes.items():
        logger.info("params: %s: %r -> %r", key, old, new)
    return {k: v[1] for k, v in changes.items()}


@flow(name="qrb-pipeline", log_prints=True)
def pipeline(workspace: str = ".", params: dict[str, Any] | None = None, until: str | None = None,
             force: list[str] | None = None, retries: dict[str, int] | None = None,
             retry_backoff_s: float = RETRY_BACKOFF_S, stage_timeout_s: float = STAGE_TIMEOUT_S) -> list[dict[str, Any]]:
    """Run the stages of dvc.yaml in order (up to `until`), after writing `params` overrides; publish artifacts.

    params: dotted-key overrides (`{"train.lora.r": 4}`), as `dvc exp run -S`. force: stages re-run even when
    unchanged (the weekly refresh forces `scrape`; DVC then re-runs downstream stages only if the data changed).
    retries: stage -> retries for transient failures (default: scrape and generate, 3 each).
    """
    ws = Path(workspace).resolve()
    order = stage_order(ws)
    unknown = [s for s in [*(force or []), *([until] if until else [])] if s not in order]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; dvc.yaml has: {', '.join(order)}")
    if until:
        order = order[:order.index(until) + 1]
    if params:
        set_params(str(ws), params)
    results: list[dict[str, Any]] = []
    error = None
    try:
        for stage in order:
            results.append(stage_task(stage, retries, retry_backoff_s)(
                stage, str(ws), timeout_s=stage_timeout_s, force=stage in (force or [])))
    except Exception as e:
        error = e.headline if isinstance(e, StageFailed) else str(e)
        raise
    finally:
        try:
            publish_artifacts(str(ws), results, error)
        except Exception as e:  # noqa: BLE001 - a report must not hide the stage's own failure
            get_run_logger().warning("could not publish artifacts: %s", e)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the DVC pipeline through Prefect")
    ap.add_argument("--workspace", default=".")
    ap.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                    help="param override, as `dvc exp run -S` (repeatable), e.g. -S train.lora.r=4")
    ap.add_argument("--until", help="stop after this stage")
    ap.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage even if unchanged")
    args = ap.parse_args(argv)
    try:
        overrides = parse_set(args.set_param)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    results = pipeline(args.workspace, params=overrides or None, until=args.until, force=args.force or None)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
