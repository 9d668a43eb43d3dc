"""The main job: the whole pipeline offline on a CPU, through Prefect, in a scratch DVC workspace.

    qrb demo [--workspace demo] [--profile tiny]      (`make demo` sets up the venv and runs this)

Wires: prepare the workspace (pipeline code + params.yaml overlaid with profiles/tiny.yaml + data/ pulled from the
in-repo DVC remote) -> build the tiny Llama -> start the journal mirror and the smoke-test OpenAI endpoint on
127.0.0.1 -> the pipeline flow (one task per DVC stage) -> commit the run in the workspace's git, so that
`dvc exp run -S ...` and `dvc metrics diff` work there right away.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from prefect import flow, task

from flows import workspace as wsp
from flows.pipeline import pipeline
from qrb.offline.services import background, host_port
from qrb.params import read_yaml

SMOKE_KEY_ENV_VALUE = "offline-smoke-test-key"  # not a secret: the local smoke endpoint accepts any key


@task
def prepare_workspace(workspace: str, profile: str, overrides: dict | None = None) -> str:
    return str(wsp.prepare(workspace, profile, overrides=overrides))


@task
def build_tiny_model(workspace: str) -> str:
    """The profile's base model, if it is a local folder the workspace lacks (deterministic, ~10 s)."""
    from qrb.offline import tiny_model

    ws = Path(workspace)
    model = read_yaml(ws / "params.yaml")["base"]["model"]
    target = ws / model
    if model.startswith("models/") and not (target / "config.json").exists():
        tiny_model.build(ws / "data" / "corpus", target)
        # tracked by DVC: queued experiments (temporary copies of the workspace) check it out like data/
        wsp.run(wsp.dvc("add", "-q", model), ws)
    return model


@task
def commit_run(workspace: str) -> None:
    wsp.commit(Path(workspace), "demo: pipeline run (dvc.lock, metrics, plots)")


def offline_services(ws: Path) -> contextlib.ExitStack:
    """Mirror + smoke endpoint at the URLs the profile's params name (127.0.0.1 only)."""
    params = read_yaml(ws / "params.yaml")
    stack = contextlib.ExitStack()
    start = params["scrape"]["start_urls"][0]
    stack.enter_context(background("journal mirror", ["-m", "qrb.offline.mirror", "--corpus", "data/corpus",
                                                      "--port", str(host_port(start)[1])], start, ws))
    gen = params["generate"]
    os.environ.setdefault(gen["api_key_env"], SMOKE_KEY_ENV_VALUE)
    stack.enter_context(background("smoke-test endpoint", ["-m", "qrb.offline.smoke", "--port",
                                                           str(host_port(gen["base_url"])[1])], gen["base_url"], ws))
    return stack


@flow(name="qrb-demo", log_prints=True)
def demo(workspace: str = "demo", profile: str = "tiny", overrides: dict | None = None) -> dict:
    """`overrides` (nested params, e.g. other service ports) are applied on top of the profile."""
    t0 = time.time()
    ws = prepare_workspace(workspace, profile, overrides)
    build_tiny_model(ws)
    with offline_services(Path(ws)):
        results = pipeline(ws)
    commit_run(ws)
    return {"workspace": ws, "stages": results, "wall_s": round(time.time() - t0, 1)}


def summary(run: dict) -> str:
    ws = Path(run["workspace"])
    rel = os.path.relpath(ws) if ws.is_relative_to(Path.cwd()) else str(ws)
    activate = Path(sys.executable).parent / "activate"
    lines = ["", (ws / "reports" / "eval_table.md").read_text(), "Stages (wall seconds; dvc skips unchanged ones):"]
    lines += [f"  {r['stage']:<9} {r['wall_s']:>7.1f}  {'ran' if r['ran'] else 'up to date'}" for r in run["stages"]]
    lines += [f"Total {run['wall_s']:.0f} s.", "", f"Outputs in {rel}/ (a git + DVC workspace):",
              f"  {rel}/artifacts/   papers, QA pairs, validated dataset, adapter, predictions",
              f"  {rel}/metrics/     stage metrics (dvc metrics show)",
              f"  {rel}/reports/     eval_table.md, data_docs/index.html (great-expectations)",
              f"  {rel}/artifacts/model_card/README.md   the model card; {rel}/artifacts/export/  merged + int8",
              f"  {rel}/plots/       loss curves and scores (dvc plots show)",
              f"Try: cd {rel} && source {activate} && dvc exp run -S train.lora.r=4 && dvc metrics diff"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from qrb.io import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(description="Run the offline demo pipeline (tiny profile) through Prefect")
    ap.add_argument("--workspace", default="demo")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--json", action="store_true", help="print the run summary as JSON")
    args = ap.parse_args(argv)
    run = demo(args.workspace, args.profile)
    print(json.dumps(run, indent=2) if args.json else summary(run))


if __name__ == "__main__":
    main()
