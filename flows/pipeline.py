"""Prefect flow: the DVC pipeline, one task per stage, in the order dvc.yaml defines.

    python -m flows.pipeline [--workspace DIR]

DVC decides what is stale (a task for an up-to-date stage finishes at once); Prefect runs, retries the stages that
touch the network (scrape, generate) with exponential backoff, and shows every run in its UI (`prefect server
start`, then http://127.0.0.1:4200; without a server a temporary local one is used). Flows only wire: each task
runs `dvc repro <stage>` and streams its output into the Prefect logs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from qrb.workspace import dvc, venv_env

NETWORK_STAGES = {"scrape": 3, "generate": 3}  # stage -> retries; deterministic stages are never retried
STAGE_TIMEOUT_S = 6 * 3600


def stage_order(workspace: Path) -> list[str]:
    """The stages as dvc.yaml lists them (dvc.yaml is written in dependency order)."""
    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages") or {}
    if not stages:
        raise SystemExit(f"{workspace / 'dvc.yaml'} defines no stages")
    return list(stages)


class StageFailed(RuntimeError):
    pass


@task(task_run_name="{stage}", log_prints=True)
def run_stage(stage: str, workspace: str, timeout_s: float = STAGE_TIMEOUT_S) -> dict[str, Any]:
    """`dvc repro <stage>`; output streamed line by line to the task's log."""
    logger = get_run_logger()
    cmd = dvc("--wait-for-lock", "repro", stage)
    logger.info("$ dvc --wait-for-lock repro %s  (in %s)", stage, workspace)
    t0 = time.time()
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=workspace, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # a sync task's timeout can't interrupt a blocking subprocess: check ourselves
            line = line.rstrip()
            if line and "it/s]" not in line and "s/it]" not in line:  # progress bars: too chatty for logs
                logger.info(line)
                tail = (tail + [line])[-30:]
            if time.time() - t0 > timeout_s:
                proc.kill()
                raise StageFailed(f"stage {stage} timed out after {timeout_s:.0f} s")
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.time() - t0
    if rc != 0:
        raise StageFailed(f"stage {stage} failed (exit {rc}):\n" + "\n".join(tail[-15:]))
    ran = not any(f"'{stage}' didn't change" in line for line in tail)
    return {"stage": stage, "wall_s": round(wall, 2), "ran": ran}


def stage_task(stage: str):
    retries = NETWORK_STAGES.get(stage, 0)
    if not retries:
        return run_stage
    return run_stage.with_options(retries=retries, retry_delay_seconds=exponential_backoff(backoff_factor=10),
                                  retry_jitter_factor=0.5)


def metrics_markdown(workspace: Path) -> str:
    table = workspace / "reports" / "eval_table.md"
    return table.read_text() if table.exists() else "(no evaluation table yet)"


@flow(name="qrb-pipeline", log_prints=True)
def pipeline(workspace: str = ".") -> list[dict[str, Any]]:
    """Run every stage of dvc.yaml in order; publish the metrics table as an artifact."""
    ws = Path(workspace).resolve()
    results = []
    for stage in stage_order(ws):
        results.append(stage_task(stage)(stage, str(ws)))
    create_markdown_artifact(key="qrb-metrics", markdown=metrics_markdown(ws),
                             description=f"Evaluation table of the pipeline in {ws}")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the DVC pipeline through Prefect")
    ap.add_argument("--workspace", default=".")
    args = ap.parse_args(argv)
    results = pipeline(args.workspace)
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
