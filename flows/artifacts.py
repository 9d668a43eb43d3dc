"""What a pipeline run publishes to Prefect, also when a stage failed: `qrb-metrics` (a failure's cause, the stages'
wall times, the eval table, every metric dvc.yaml declares), `qrb-metrics-diff` (`dvc metrics diff` against the last
commit), `qrb-links` (model card, Data Docs, the offline plots page; each also a link artifact) and `<stage>-progress`
while a stage runs. It only reads the workspace and asks DVC."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from flows.workspace import PLOTS_PAGE, dvc, dvc_stages, paths, plots_page, venv_env

PLOTS_DIR = "reports/plots"  # `dvc plots show -o` target (index.html)
DATA_DOCS = "reports/data_docs/index.html"
EVAL_TABLE = "reports/eval_table.md"


def _dvc_out(workspace: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(dvc(*args), cwd=workspace, env=venv_env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    return proc.stdout if proc.returncode == 0 else None


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [] if isinstance(value, list) else [(prefix, value)]


def declared(workspace: Path, kind: str) -> list[str]:
    """Paths dvc.yaml declares under `kind` (metrics, plots, outs) across its stages."""
    return [p for spec in dvc_stages(workspace).values() for p in paths(spec.get(kind))]


def plot_sources(workspace: Path) -> list[str]:
    """What dvc.yaml's plots draw: the stages' `plots` outs, and each top-level plot's files (`y`) or id."""
    found = declared(workspace, "plots")
    for entry in (yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}).get("plots") or []:
        props = next(iter(entry.values())) if isinstance(entry, dict) else None
        y = props.get("y") if isinstance(props, dict) else None
        found += list(y) if isinstance(y, dict) else paths([entry])
    return found


def metrics_markdown(workspace: Path) -> str:
    """The card's eval table (if evaluate ran) and every declared metric, flattened (file | metric | value)."""
    parts = []
    table = workspace / EVAL_TABLE
    if table.exists():
        parts.append(table.read_text().strip())
    rows: list[tuple[str, str, Any]] = []
    for rel in declared(workspace, "metrics"):
        path = workspace / rel
        if path.suffix == ".json" and path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                rows += [(rel, k, v) for k, v in _flatten("", json.loads(path.read_text()))]
    if rows:
        lines = ["| file | metric | value |", "|---|---|---|"]
        # 4 significant digits for a person (the files keep 6 decimals)
        lines += [f"| {f} | {k} | {float(f'{v:.4g}') if isinstance(v, float) else v} |" for f, k, v in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) if parts else "(no metrics yet)"


def metrics_diff_markdown(workspace: Path) -> str:
    """`dvc metrics diff --md` between the last commit (the previous committed run) and the workspace."""
    if not (workspace / ".git").exists():
        return "(not a git repository: no previous run to compare with)"
    out = _dvc_out(workspace, "metrics", "diff", "--md")
    if out is None:
        return "(`dvc metrics diff` failed: no previous run?)"
    rows = [line for line in out.strip().splitlines()[2:] if line.strip()]  # below the header and its rule
    return out.strip() if rows else "No metric changed since the last committed run."


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
    """`dvc plots show -o reports/plots` on the offline page template; the page, or None when nothing is plotted."""
    if not any((workspace / p).exists() for p in plot_sources(workspace)):
        return None
    template = workspace / ".dvc" / PLOTS_PAGE
    if not template.exists():
        template.parent.mkdir(parents=True, exist_ok=True)
        template.write_text(plots_page(), encoding="utf-8")
    (workspace / PLOTS_DIR).mkdir(parents=True, exist_ok=True)  # DVC 3.67 fails on a missing folder above `-o`
    if _dvc_out(workspace, "plots", "show", "-o", PLOTS_DIR, "--html-template", str(template)) is None:
        return None
    page = workspace / PLOTS_DIR / "index.html"
    return page if page.exists() else None


def links(workspace: Path) -> dict[str, Path]:
    found = {"model card": model_card(workspace), "Data Docs": workspace / DATA_DOCS, "plots": render_plots(workspace)}
    return {name: path for name, path in found.items() if path is not None and path.exists()}


def run_markdown(workspace: Path, results: list[dict[str, Any]], error: str | None = None) -> str:
    """`qrb-metrics`: the failure's one-line cause (if the run failed), the stages that finished, the metrics."""
    status = f"**Failed**: {error.splitlines()[0]}\n\n" if error else ""
    stages = "\n".join(f"| {r['stage']} | {r['wall_s']} | {'ran' if r['ran'] else 'up to date'} |" for r in results)
    stages_md = f"| stage | wall s | |\n|---|---|---|\n{stages}\n\n" if results else ""
    # a failed run leaves the outputs of the stages it did not finish as they were: say whose numbers these are
    done = ", ".join(r["stage"] for r in results) or "none"
    label = (f"_The metrics below are from the last successful run of each stage (stages this run finished: "
             f"{done})._\n\n") if error else ""
    return status + stages_md + label + metrics_markdown(workspace)


class StageProgress:
    """`<stage>-progress`: one per stage run, moved by its long tqdm bars at most every `GAP_S`; a failed update is
    logged, never fatal."""

    GAP_S = 2.0

    def __init__(self, stage: str):
        self.stage, self.id, self.at = stage, None, 0.0

    def __call__(self, bar: re.Match | None, done: str = "") -> None:
        if not done and self.id is not None and time.monotonic() - self.at < self.GAP_S and bar["pct"] != "100":
            return
        self.at = time.monotonic()
        if done:
            pct, text = 100.0, done
        else:
            left = f", ~{bar['left']} left" if bar["left"] not in (None, "?") else ""
            pct, text = float(bar["pct"]), " ".join(f"{bar['desc'] or ''} {bar['pct']}% ({bar['n']}/{bar['total']}), "
                                                    f"{bar['elapsed']} elapsed{left}".split())
        try:
            if self.id is None:
                self.id = create_progress_artifact(pct, key=f"{self.stage.replace('_', '-')}-progress",
                                                   description=f"{self.stage}: {text}")
            else:
                update_progress_artifact(self.id, pct, description=f"{self.stage}: {text}")
        except Exception as e:  # noqa: BLE001 - the UI's progress must never fail the stage
            get_run_logger().debug("progress artifact: %s", e)


@task(name="publish-artifacts")
def publish_artifacts(workspace: str, results: list[dict[str, Any]], error: str | None = None) -> dict[str, str]:
    """The run's artifacts (`error`: the failure's message, None for a run that completed); returns their keys."""
    ws = Path(workspace)
    keys = {"metrics": create_markdown_artifact(
        key="qrb-metrics", markdown=run_markdown(ws, results, error), description=f"Metrics of the pipeline in {ws}")}
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
