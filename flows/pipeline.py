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

Failures: a stage that failed deterministically (bad params — the stage's one-line `<stage>: params: ...` error —,
or a DVC error before the stage's command ran) is never retried, even for a network stage; the validate gate and
the other local stages have no retries at all. Each run publishes artifacts (readable in the UI and through the API):
`qrb-metrics` (every metric file dvc.yaml declares, flattened, plus the card's eval table), `qrb-metrics-diff`
(`dvc metrics diff` against the workspace's last commit, i.e. the previous committed run) and `qrb-links` (model card,
great-expectations Data Docs, `dvc plots show` HTML), also when a stage failed.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.tasks import exponential_backoff

from flows.workspace import dvc, venv_env
from qrb.params import parse_set

NETWORK_STAGES = {"scrape": 3, "generate": 3}  # stage -> retries; deterministic stages are never retried
RETRY_BACKOFF_S = 10.0  # first retry after ~10 s, then 20 s, 40 s (± jitter)
STAGE_TIMEOUT_S = 6 * 3600
PROGRESS_BAR = re.compile(r"\d+%\|.*\]\s*$|\[A\s*$")  # tqdm lines: too chatty for logs (the last one is kept)
PLOTS_DIR = "reports/plots"  # `dvc plots show -o` target (index.html)
DATA_DOCS = "reports/data_docs/index.html"


def stage_order(workspace: Path) -> list[str]:
    """The stages as dvc.yaml lists them (dvc.yaml is written in dependency order)."""
    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages") or {}
    if not stages:
        raise SystemExit(f"{workspace / 'dvc.yaml'} defines no stages")
    return list(stages)


class StageFailed(RuntimeError):
    """A stage failed in a way that may pass on a retry (network stages are retried)."""


class DeterministicFailure(StageFailed):
    """A failure a retry cannot fix: bad params, a DVC error before the command ran. Never retried."""


def _deterministic(stage: str, tail: list[str]) -> str | None:
    """Why a failed `dvc repro <stage>` cannot pass on a retry, or None."""
    text = "\n".join(tail)
    if f"{stage}: params:" in text or "profile: unknown key" in text:
        return "bad params"
    if "ERROR:" in text and "failed to run:" not in text:  # DVC refused before running the command
        return "DVC error (the stage's command did not run)"
    return None


def stream(cmd: list[str], workspace: str | Path, timeout_s: float, logger: Any) -> tuple[int, list[str]]:
    """Run `cmd`, each output line to `logger` (progress bars: their final state only); returns (exit code, last
    lines). A watchdog kills it after `timeout_s` (a sync task's timeout can't interrupt a blocking subprocess)."""
    tail: list[str] = []
    bar = ""
    proc = subprocess.Popen(cmd, cwd=workspace, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
    if timed_out:
        raise StageFailed(f"`{' '.join(cmd[2:])}` timed out after {timeout_s:.0f} s")
    return rc, tail


@task(task_run_name="{stage}", log_prints=True)
def run_stage(stage: str, workspace: str, timeout_s: float = STAGE_TIMEOUT_S, force: bool = False) -> dict[str, Any]:
    """`dvc --wait-for-lock repro <stage>` (`--force --single-item` when forced); output streamed to the task's log."""
    logger = get_run_logger()
    args = ["--wait-for-lock", "repro", *(["--force", "--single-item"] if force else []), stage]
    logger.info("$ dvc %s  (in %s)", " ".join(args), workspace)
    t0 = time.time()
    rc, tail = stream(dvc(*args), workspace, timeout_s, logger)
    wall = time.time() - t0
    if rc != 0:
        why = _deterministic(stage, tail)
        msg = f"stage {stage} failed (exit {rc}{', ' + why + ', not retried' if why else ''}):\n" + "\n".join(tail[-15:])
        raise (DeterministicFailure if why else StageFailed)(msg)
    ran = not any(f"'{stage}' didn't change" in line for line in tail)
    return {"stage": stage, "wall_s": round(wall, 2), "ran": ran}


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry unless the failure is deterministic."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - an unreadable result: let the retry policy decide
            return True
    return not isinstance(exc, DeterministicFailure)


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


# --- artifacts -----------------------------------------------------------------------------------------------------

def _dvc_out(workspace: Path, *args: str, timeout: float = 120) -> str | None:
    try:
        proc = subprocess.run(dvc(*args), cwd=workspace, env=venv_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(value, list):
        out.append((prefix, value))


def declared(workspace: Path, kind: str) -> list[str]:
    """Paths dvc.yaml declares under `kind` (metrics, plots, outs) across its stages."""
    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("stages") or {}
    paths = []
    for spec in stages.values():
        for entry in spec.get(kind) or []:
            paths.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return paths


def metrics_markdown(workspace: Path) -> str:
    """The card's eval table (if evaluate ran) and every declared metric, flattened (file | metric | value)."""
    parts = []
    table = workspace / "reports" / "eval_table.md"
    if table.exists():
        parts.append(table.read_text().strip())
    rows: list[tuple[str, str, Any]] = []
    for rel in declared(workspace, "metrics"):
        path = workspace / rel
        if path.suffix == ".json" and path.exists():
            try:
                flat: list[tuple[str, Any]] = []
                _flatten("", json.loads(path.read_text()), flat)
            except json.JSONDecodeError:
                continue
            rows += [(rel, k, v) for k, v in flat]
    if rows:
        lines = ["| file | metric | value |", "|---|---|---|"]
        lines += [f"| {f} | {k} | {v} |" for f, k, v in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "(no metrics yet)"


def metrics_diff_markdown(workspace: Path) -> str:
    """`dvc metrics diff --md` between the last commit (the previous committed run) and the workspace."""
    if not (workspace / ".git").exists():
        return "(not a git repository: no previous run to compare with)"
    out = _dvc_out(workspace, "metrics", "diff", "--md")
    if out is None:
        return "(`dvc metrics diff` failed: no previous run?)"
    return out.strip() or "(no metric changed since the last committed run)"


def model_card(workspace: Path) -> Path | None:
    """The model card if a stage wrote one: an out of dvc.yaml named *card* (peft's own adapter README is not one)."""
    for rel in [p for p in declared(workspace, "outs") if "card" in p.lower()]:
        path = workspace / rel
        if path.is_dir():
            path = path / "README.md"
        if path.is_file():
            return path
    return None


def render_plots(workspace: Path) -> Path | None:
    """`dvc plots show -o reports/plots`; the HTML page, or None when there is nothing to plot."""
    if not any((workspace / p).exists() for p in declared(workspace, "plots")):
        return None
    if _dvc_out(workspace, "plots", "show", "-o", PLOTS_DIR) is None:
        return None
    page = workspace / PLOTS_DIR / "index.html"
    return page if page.exists() else None


def links(workspace: Path) -> dict[str, Path]:
    found = {"model card": model_card(workspace), "Data Docs": workspace / DATA_DOCS, "plots": render_plots(workspace)}
    return {name: path for name, path in found.items() if path is not None and path.exists()}


@task(name="publish-artifacts")
def publish_artifacts(workspace: str, results: list[dict[str, Any]], error: str | None = None) -> dict[str, str]:
    """The run's artifacts: metrics table, metrics diff against the previous run, links. Returns their keys."""
    ws = Path(workspace)
    status = f"**Failed**: {error.splitlines()[0]}\n\n" if error else ""
    stages = "\n".join(f"| {r['stage']} | {r['wall_s']} | {'ran' if r['ran'] else 'up to date'} |" for r in results)
    stages_md = f"| stage | wall s | |\n|---|---|---|\n{stages}\n\n" if results else ""
    keys = {"metrics": create_markdown_artifact(
        key="qrb-metrics", markdown=status + stages_md + metrics_markdown(ws),
        description=f"Metrics of the pipeline in {ws}")}
    keys["metrics-diff"] = create_markdown_artifact(
        key="qrb-metrics-diff", markdown=metrics_diff_markdown(ws),
        description="dvc metrics diff: the workspace against its last commit (the previous committed run)")
    found = links(ws)
    lines = [f"- [{name}]({path.resolve().as_uri()})  `{path.relative_to(ws)}`" for name, path in found.items()]
    keys["links"] = create_markdown_artifact(
        key="qrb-links", markdown="\n".join(lines) or "(no model card, Data Docs or plots yet)",
        description="Model card, Data Docs and plots of this run (file:// links on the machine that ran it)")
    for name, path in found.items():
        create_link_artifact(key="qrb-" + name.lower().replace(" ", "-"), link=path.resolve().as_uri(),
                             link_text=str(path.relative_to(ws)))
    return {k: str(v) for k, v in keys.items()}


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
        error = str(e)
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
