"""The main job: the whole pipeline offline on a CPU, through Prefect, in a scratch DVC workspace.

    qrb demo [--workspace demo] [--profile smol] [-S key=value ...] [--server] [--force]      (`make demo`)

Wires: prepare the workspace -> build the profile's offline base model if it lacks it (tracked by DVC) -> start the
stand-ins -> the pipeline flow -> commit the run in the workspace's git (so `dvc exp run`, `dvc metrics diff` work
there). The console shows one line per step; the rest is in <workspace>/logs/demo.log, the summary in demo.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows import console
from flows import overrides as ov
from flows import server as srv
from flows import workspace as wsp
from flows.pipeline import exit_code, headline, pipeline, stream
from qrb.errors import ConfigError
from qrb.params import nested, parse_set, read_yaml
from standins import services

DEFAULT_PROFILE = "smol"
# the offline base models a profile may name (base.model), and the command that builds each in the workspace
OFFLINE_MODELS = {
    "models/smollm2-135m-instruct": ["-m", "standins.smol_model", "--out", "models/smollm2-135m-instruct"],
    "models/tiny-llama": ["-m", "standins.tiny_model", "--corpus", "data/corpus", "--out", "models/tiny-llama"],
}
BUILD_TIMEOUT_S = 1800
# GB a first run of each writes in its workspace, with room to spare (DVC's cache holds a second copy of each output,
# the merged export is in float32): a full disk found before anything is written, not at export
DISK_NEED_GB = {"models/smollm2-135m-instruct": 4.0, "models/tiny-llama": 0.1}


@task
def prepare_workspace(workspace: str, profile: str, overrides: dict | None = None, force: bool = False) -> str:
    t0 = time.time()
    ws = wsp.prepare(workspace, profile, overrides=overrides, force=force)
    console.say(get_run_logger(), "  %-10s %5.0f s  code and params.yaml (profile %s) synced, data/ from the DVC "
                "remote", "workspace", time.time() - t0, profile)
    return str(ws)


@task
def build_base_model(workspace: str) -> str:
    """The profile's base model, when it is one of OFFLINE_MODELS and the workspace lacks it (the builders are
    deterministic, and a no-op when built), then `dvc add`ed: queued experiments (temporary copies of the workspace)
    check it out like data/, and its .dvc file is a dep of the stages that load it."""
    logger = get_run_logger()
    ws = Path(workspace)
    model = read_yaml(ws / "params.yaml")["base"]["model"]
    t0 = time.time()
    if model not in OFFLINE_MODELS:
        console.say(logger, "  %-10s %5.0f s  %s (not built here: a hub id or your own folder)", "base model", 0, model)
        return model
    did = "in the workspace"
    if not (ws / model / "config.json").exists():
        rc, tail = stream([sys.executable, *OFFLINE_MODELS[model]], ws, BUILD_TIMEOUT_S, logger)
        if rc != 0:
            raise ConfigError(f"building {model} failed (exit {rc}): {tail[-1] if tail else 'no output'}")
        did = "built"
    if not (ws / f"{model}.dvc").exists():
        wsp.run(wsp.dvc("add", "-q", model), ws)
        wsp.commit(ws, f"workspace: {model} tracked by DVC")  # so a run's lineage sees no uncommitted source
        did += ", tracked by DVC"
    console.say(logger, "  %-10s %5.0f s  %s %s", "base model", time.time() - t0, model, did)
    return model


@task
def commit_run(workspace: str) -> None:
    wsp.commit(Path(workspace), "demo: pipeline run (dvc.lock, metrics, plots)")


@flow(name="qrb-demo", log_prints=True)
def demo(workspace: str = "demo", profile: str = DEFAULT_PROFILE, overrides: dict | None = None,
         force: bool = False) -> dict:
    """`overrides` (nested params, e.g. other service ports) are applied on top of the profile; `force` refreshes the
    workspace over edits made there since its last refresh."""
    t0 = time.time()
    ws = prepare_workspace(workspace, profile, overrides, force)
    build_base_model(ws)
    params = read_yaml(Path(ws) / "params.yaml")
    with services.stand_ins(Path(ws)):
        console.say(get_run_logger(), "  %-10s %5s    mirror %s, smoke endpoint %s", "services", "",
                    params["scrape"]["start_urls"][0], params["generate"]["base_url"])
        results = pipeline(ws)
    commit_run(ws)
    return {"workspace": ws, "profile": profile, "stages": results, "wall_s": round(time.time() - t0, 1)}


def check_disk(workspace: Path, model: str) -> None:
    """Refuse a first run (no dvc.lock yet) of an offline model where its disk lacks the room the run will fill."""
    need = DISK_NEED_GB.get(model)
    if need is None or (workspace / "dvc.lock").exists():
        return
    where = next(p for p in [workspace.resolve(), *workspace.resolve().parents] if p.exists())
    free = shutil.disk_usage(where).free / 1e9
    if free < need:
        raise ConfigError(f"{where} has {free:.1f} GB free, and a first run on {model} writes about {need:g} GB "
                          "there: free some disk space or choose another --workspace")


def summary(run: dict, log: Path) -> str:
    """The end of the demo: console.results (grades, what changed, an example), then where everything else is."""
    ws = Path(run["workspace"])
    rel = os.path.relpath(ws) if ws.is_relative_to(Path.cwd()) else str(ws)
    activate = Path(sys.executable).parent / "activate"
    stages = ", ".join(f"{r['stage']} {r['wall_s']:.0f}s" + ("" if r["ran"] else " (up to date)")
                       for r in run["stages"])
    tail = [f"Stages: {stages}; total {run['wall_s']:.0f} s (profile {run['profile']}).",
            f"In {rel}/ (git + DVC): reports/ (every table and number, data_docs/), artifacts/ (data, adapter, "
            f"model_card/, export/: merged + GGUF), metrics/, plots/ (dvc plots show); the log: {log}",
            f"Try: cd {rel} && source {activate} && dvc exp run -S train.lora.r=4 && dvc metrics diff"]
    wrapped = [w for t in tail for w in textwrap.wrap(t, console.SCREEN, subsequent_indent="  ",
                                                      break_long_words=False, break_on_hyphens=False)]
    return "\n".join(["", *console.results(ws), "", *wrapped])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the offline demo pipeline through Prefect")
    ap.add_argument("--workspace", default="demo", help="the scratch workspace to create or refresh (default demo)")
    ap.add_argument("--profile", default=DEFAULT_PROFILE,
                    help=f"profile in profiles/ or a YAML path (default {DEFAULT_PROFILE}: SmolLM2-135M; tiny: the "
                         "fast stand-in)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="param override on top of the profile (repeatable), e.g. -S train.epochs=1")
    ap.add_argument("--server", action="store_true",
                    help="report to a persistent Prefect server (PREFECT_API_URL, else 127.0.0.1:4200, started in "
                         "the background if none answers) and print the run's page in its UI")
    ap.add_argument("--json", action="store_true", help="print the run summary as JSON")
    ap.add_argument("--force", action="store_true", help="refresh the workspace even over edits made there since")
    args = ap.parse_args(argv)
    try:
        dotted = parse_set(args.set)
        # a missing profile, a typo or a bad value fails here, in one line, before anything is written
        params = wsp.profile_params(args.profile)
        ov.check(wsp.REPO_ROOT, dotted, params=params)
        wsp.check_target(args.workspace, force=args.force)
        check_disk(Path(args.workspace), dotted.get("base.model", params["base"]["model"]))
        overrides = nested(dotted) or None
        api_url, pid = srv.ensure() if args.server else (None, None)
    except (ConfigError, ValueError) as e:
        sys.exit(f"qrb demo: {e}")
    ws = Path(args.workspace)
    log = ws / "logs" / "demo.log"
    with console.quiet(log, restore=False):
        console.line(f"qrb demo: profile {args.profile}, workspace {ws}/; details in {log}")
        if pid:
            console.line(f"Prefect server started in the background (pid {pid}; stop it with `kill {pid}`)")
        state = None
        try:
            with srv.using(api_url) if api_url else contextlib.nullcontext():
                state = demo(str(ws), args.profile, overrides, args.force, return_state=True)
                run = state.result()
        except Exception as e:  # noqa: BLE001 - its cause in one line; the traceback is in the log
            console.line(f"qrb demo failed: {headline(e)}")
            console.line(f"details in {log}" + (f"; the run in Prefect's UI: {page(api_url, state)}" if api_url
                                                 and state is not None else ""))
            sys.exit(exit_code(e))
    (log.parent / "demo.json").write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps(run, indent=2) if args.json else summary(run, log))
    if api_url:
        print(f"The run in Prefect's UI: {page(api_url, state)}")


def page(api_url: str, state) -> str:
    return srv.ui_url(api_url, state.state_details.flow_run_id)


if __name__ == "__main__":
    main()
