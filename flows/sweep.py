"""Prefect flow: the card's technique x hyper-parameter sweep as DVC experiments, narrowed by Optuna.

    qrb sweep [--workspace DIR] [--config flows/sweep.yaml] [--trials N] [-S key=value ...] [--profile tiny]

The pipeline brings the stages before the config's `target` up to date once (with `--profile`, in a scratch
workspace with its stand-ins, as `qrb demo`); then the grid as named experiments (`mode: sequential` in the workspace,
or `queue`), then per technique an Optuna TPE study seeded with its grid results proposes `search.trials` more; the
end is the table "best eval cross-entropy per technique" (artifact `qrb-sweep`). docs/orchestration.md#sweeps.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import workspace as wsp
from flows.demo import build_base_model, prepare_workspace
from flows.pipeline import StageFailed, pipeline, run_reported, stage_failure, stage_order
from flows.workspace import REPO_ROOT, dvc
from qrb.errors import ConfigError
from qrb.io import setup_logging
from qrb.params import deep_merge, nested, parse_set
from standins.services import port_overrides, stand_ins

DEFAULT_CONFIG = REPO_ROOT / "flows" / "sweep.yaml"
EXPERIMENT_TIMEOUT_S = 12 * 3600
TECHNIQUE_KEY = "train.method"
CONFIG_KEYS = {"target", "metric", "mode", "jobs", "fixed", "grid", "search", "report", "card"}


@dataclass
class SweepConfig:
    grid: dict[str, list[Any]]
    target: str = "train"
    metric_file: str = "metrics/train.json"
    metric_key: str = "eval_ce"
    mode: str = "sequential"
    jobs: int = 1
    fixed: dict[str, Any] = field(default_factory=dict)
    trials: int = 0
    seed: int = 0
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: list[dict[str, str]] = field(default_factory=list)  # extra columns: {name, file, key} read per run
    card: dict[str, float] = field(default_factory=dict)  # a published figure per technique, shown beside ours

    @property
    def methods(self) -> list[str]:
        return list(self.grid[TECHNIQUE_KEY])


def load_config(path: str | Path, trials: int | None = None) -> SweepConfig:
    """Read and check a sweep YAML; a mistake is a ValueError naming the key."""
    path = Path(path)
    data = yaml.safe_load(path.read_text()) or {}

    def need(ok: Any, message: str) -> None:
        if not ok:
            raise ValueError(f"{path}: {message}")

    unknown = sorted(set(data) - CONFIG_KEYS)
    need(not unknown, f"unknown key `{''.join(unknown[:1])}`; keys: {', '.join(sorted(CONFIG_KEYS))}")
    grid, metric, search = data.get("grid") or {}, data.get("metric") or {}, data.get("search") or {}
    need(isinstance(grid, dict) and grid.get(TECHNIQUE_KEY), f"`grid` must list the techniques under `{TECHNIQUE_KEY}`")
    for key, values in grid.items():
        need(isinstance(values, list) and values, f"`grid.{key}` must be a non-empty list")
    report, card, mode = data.get("report") or [], data.get("card") or {}, data.get("mode", "sequential")
    need(isinstance(report, list) and all(isinstance(r, dict) and set(r) == {"name", "file", "key"} for r in report),
         "`report` must be a list of {name, file, key} (a metrics file and a dotted key)")
    need(isinstance(card, dict) and all(isinstance(v, (int, float)) for v in card.values()),
         "`card` must map a technique to a number, e.g. {lora: 0.4603}")
    need(mode in ("sequential", "queue"), f"`mode` must be sequential or queue, got {mode!r}")
    space = search.get("space") or {}
    for key, spec in space.items():
        need(key != TECHNIQUE_KEY, f"`search.space.{key}`: the techniques come from `grid.{TECHNIQUE_KEY}`")
        need(spec.get("type", "float") in ("int", "float") and spec.get("low") and spec.get("high")
             and float(spec["low"]) < float(spec["high"]), f"`search.space.{key}` needs type int|float and 0 < low < high")
    trials = int(search.get("trials", 0) if trials is None else trials)
    need(space or not trials, "`search.trials` needs `search.space`")
    return SweepConfig(grid=grid, target=data.get("target", "train"),
                      metric_file=metric.get("file", "metrics/train.json"), metric_key=metric.get("key", "eval_ce"),
                      mode=mode, jobs=int(data.get("jobs", 1)), fixed=dict(data.get("fixed") or {}),
                      trials=trials, seed=int(search.get("seed", 0)),
                      space=space, report=report, card={k: float(v) for k, v in card.items()})


def grid_points(cfg: SweepConfig) -> list[dict[str, Any]]:
    keys = list(cfg.grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(cfg.grid[k] for k in keys))]


def set_args(overrides: dict[str, Any]) -> list[str]:
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def read_metric(workspace: Path, cfg: SweepConfig) -> float | None:
    """The run's metric; None when the run has none (eval_ce is null without an eval set)."""
    value = dotted(json.loads((workspace / cfg.metric_file).read_text()), cfg.metric_key)
    return None if value is None else float(value)


@task(task_run_name="{name}")
def run_experiment(name: str, overrides: dict[str, Any], workspace: str, cfg: SweepConfig) -> dict[str, Any]:
    """`dvc exp run -n <name> -S ... <target>` in the workspace; returns the run with its metric."""
    logger = get_run_logger()
    args = ["--wait-for-lock", "exp", "run", "-n", name, *set_args(overrides), cfg.target]
    logger.info("$ dvc %s", " ".join(args))
    t0 = time.time()
    rc, tail, status = run_reported(dvc(*args), workspace, EXPERIMENT_TIMEOUT_S, logger)
    if rc != 0:
        raise stage_failure(f"experiment {name}", rc, status, tail)
    return {"name": name, "params": overrides, "metric": read_metric(Path(workspace), cfg),
            "report": read_report(Path(workspace), cfg.report), "wall_s": round(time.time() - t0, 1)}


@task(name="queued-experiments")
def run_queued(points: list[tuple[str, dict[str, Any]]], workspace: str, cfg: SweepConfig) -> list[dict[str, Any]]:
    """`dvc exp run --queue` each point, `dvc queue start -j N`, wait, collect metrics from `dvc exp show --json` (a
    list of baselines, each with its experiments' revs)."""
    logger = get_run_logger()
    ws = Path(workspace)
    for name, overrides in points:
        wsp.run(dvc("exp", "run", "--queue", "-n", name, *set_args(overrides), cfg.target), ws)
    wsp.run(dvc("queue", "start", "-j", str(cfg.jobs)), ws)
    # polled, not `dvc exp run --run-all`: that waits with no limit on an experiment that fails during its setup
    t0, names = time.time(), {name for name, _ in points}
    while True:
        status = wsp.run(dvc("queue", "status"), ws).stdout
        # rows: Task (rev) | Name | Created | Status
        pending = [line for line in status.splitlines()
                   if names & set(line.split()) and ("Queued" in line or "Running" in line)]
        if not pending:
            break
        if time.time() - t0 > EXPERIMENT_TIMEOUT_S * len(points):
            raise StageFailed("queued experiments", "timeout", None,
                              f"still pending after {EXPERIMENT_TIMEOUT_S * len(points):.0f} s")
        time.sleep(5)
    logger.info(status)
    shown = json.loads(wsp.run(dvc("exp", "show", "--json"), ws).stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            found.update({rev["name"]: rev["data"] for rev in exp["revs"] if rev.get("name") in names})
    runs = []
    for name, overrides in points:
        try:  # a null metric (no eval set) is no failure
            value, error = dotted(found[name]["metrics"][cfg.metric_file]["data"], cfg.metric_key), None
        except (KeyError, TypeError):
            value, error = None, f"no {cfg.metric_key} (see `dvc queue logs {name}`)"
        runs.append({"name": name, "params": overrides, "metric": None if value is None else float(value),
                     "error": error})
    return runs


def distributions(cfg: SweepConfig) -> dict[str, Any]:
    from optuna.distributions import FloatDistribution, IntDistribution

    out = {}
    for key, spec in cfg.space.items():
        cls, cast = (IntDistribution, int) if spec.get("type", "float") == "int" else (FloatDistribution, float)
        out[key] = cls(cast(spec["low"]), cast(spec["high"]), log=bool(spec.get("log", False)))
    return out


def make_studies(cfg: SweepConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One TPE study per technique, seeded with that technique's finished runs that fall inside the space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = distributions(cfg)
    studies = {}
    for i, method in enumerate(cfg.methods):
        study = optuna.create_study(direction="minimize", study_name=f"sweep-{method}",
                                    sampler=optuna.samplers.TPESampler(seed=cfg.seed + i, n_startup_trials=2))
        for run in runs:
            if run["params"].get(TECHNIQUE_KEY) != method or run.get("metric") is None:
                continue
            params = {k: run["params"].get(k) for k in dists}
            if any(v is None or not dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in params.items()):
                continue
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=run["metric"]))
        studies[method] = study
    return studies


def suggest(study: Any, cfg: SweepConfig) -> tuple[Any, dict[str, Any]]:
    trial = study.ask(distributions(cfg))  # 3 significant digits: readable -S values
    return trial, {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in trial.params.items()}


def fmt_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def dotted(data: Any, key: str) -> Any:
    return functools.reduce(lambda node, part: node[part], key.split("."), data)


def read_report(workspace: Path, report: list[dict[str, str]]) -> dict[str, float | None]:
    """The config's extra columns for one finished run (None where a file or key is missing)."""
    out: dict[str, float | None] = {}
    for col in report:
        try:
            out[col["name"]] = float(dotted(json.loads((workspace / col["file"]).read_text()), col["key"]))
        except (OSError, KeyError, TypeError, ValueError):
            out[col["name"]] = None
    return out


def _scored(run: dict[str, Any]) -> bool:
    return run.get("metric") is not None and math.isfinite(run["metric"])


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The lowest finite metric; runs without one (failed, or no eval set: null) are never the best."""
    return min((r for r in runs if _scored(r)), key=lambda r: r["metric"], default=None)


def best_per_technique(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["params"].get(TECHNIQUE_KEY) == method]
        failed = sum(not _scored(r) and (r.get("metric") is not None or bool(r.get("error"))) for r in mine)
        rows.append({"technique": method, "best": best_run(mine), "runs": len(mine), "failed": failed})
    return sorted(rows, key=lambda row: (row["best"] is None, row["best"]["metric"] if row["best"] else 0))


def table_markdown(rows: list[dict[str, Any]], cfg: SweepConfig) -> str:
    """Best eval cross-entropy per technique, the config's extra columns and the card's published figure beside it."""
    keys = list(dict.fromkeys(k for k in [*cfg.grid, *cfg.space] if k != TECHNIQUE_KEY))
    extra = [col["name"] for col in cfg.report]
    card = (lambda t: [f"{cfg.card[t]:.4f}" if t in cfg.card else "–"]) if cfg.card else (lambda t: [])
    head = ["technique", f"best eval cross-entropy ({cfg.metric_key})", *(["card"] if cfg.card else []), *extra,
            *keys, "experiment", "runs"]
    lines = ["Best eval cross-entropy per technique (lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = row["best"]
        cells = [row["technique"]]
        if best:
            got = best.get("report") or {}
            cells += [f"{best['metric']:.4f}", *card(row["technique"]),
                      *("–" if got.get(x) is None else f"{got[x]:.3f}" for x in extra),
                      *(fmt_value(best["params"].get(k, "")) for k in keys), best["name"]]
        else:
            what = "no eval set" if row["runs"] > row["failed"] else "failed"  # ran, but with no metric: null
            cells += [what, *card(row["technique"]), *([""] * (len(extra) + len(keys))), ""]
        cells.append(f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@flow(name="qrb-sweep", log_prints=True)
def sweep(workspace: str = ".", config: str = str(DEFAULT_CONFIG), profile: str | None = None,
          params: dict[str, Any] | None = None, trials: int | None = None, ports: list[int] | None = None,
          apply_best: bool = False, force: bool = False) -> dict[str, Any]:
    """Grid + Optuna search as DVC experiments; returns {"runs": [...], "table": markdown}. `profile`: first prepare
    `workspace` for it (its stand-ins on `ports` [mirror, endpoint]); `params`: the baseline overrides."""
    cfg = load_config(config, trials)
    logger = get_run_logger()
    with contextlib.ExitStack() as stack:
        if profile:  # a scratch workspace with the stand-ins' ports and the baseline params written in
            overrides = port_overrides(wsp.profile_params(profile), *ports) if ports else {}
            fixed = nested({**cfg.fixed, **(params or {})})
            if fixed:
                overrides = deep_merge(wsp.profile_params(profile, overrides=overrides), fixed)
            workspace = prepare_workspace(workspace, profile, overrides or None, force)
            build_base_model(workspace)
            url = wsp.read_yaml(Path(workspace) / "params.yaml")["scrape"]["start_urls"][0]
            if "//127.0.0.1" in url or "//localhost" in url:
                stack.enter_context(stand_ins(Path(workspace)))
        ws = Path(workspace).resolve()
        order = stage_order(ws)
        if cfg.target not in order:
            raise ValueError(f"sweep target {cfg.target!r} is not a stage of {ws / 'dvc.yaml'}")
        upstream = order[:order.index(cfg.target)]
        baseline = {} if profile else {**cfg.fixed, **(params or {})}  # a profile's workspace has them already
        if upstream or baseline:
            pipeline(str(ws), params=baseline or None, until=upstream[-1] if upstream else None)
        if profile:  # a scratch workspace: the baseline commit every experiment starts from
            wsp.commit(ws, "sweep: baseline")

    sweep_id = "s" + time.strftime("%m%d%H%M%S")
    runs: list[dict[str, Any]] = []

    def attempt(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
        try:
            run = run_experiment(name, overrides, str(ws), cfg)
        except Exception as e:  # noqa: BLE001 - one failed point must not end the sweep
            logger.warning("experiment %s failed: %s", name, str(e).splitlines()[0])
            run = {"name": name, "params": overrides, "metric": None, "error": str(e).splitlines()[0]}
        runs.append(run)
        return run

    points = [(f"{sweep_id}-g{i:02d}-{p[TECHNIQUE_KEY]}", p) for i, p in enumerate(grid_points(cfg))]
    logger.info("phase 1: %d grid experiments (%s)", len(points), cfg.mode)
    if cfg.mode == "queue":
        runs += run_queued(points, str(ws), cfg)
    else:
        for name, overrides in points:
            attempt(name, overrides)

    if cfg.trials:
        from optuna.trial import TrialState

        logger.info("phase 2: %d Optuna trials over %s", cfg.trials, ", ".join(cfg.space))
        studies = make_studies(cfg, runs)
        seen = {json.dumps(r["params"], sort_keys=True): r for r in runs}
        for i in range(cfg.trials):
            method = cfg.methods[i % len(cfg.methods)]
            trial, suggested = suggest(studies[method], cfg)
            overrides = {**{k: v for k, v in grid_points(cfg)[0].items() if k not in suggested},
                         TECHNIQUE_KEY: method, **suggested}
            key = json.dumps(overrides, sort_keys=True)
            run = seen.get(key) or attempt(f"{sweep_id}-t{i:02d}-{method}", overrides)
            seen[key] = run
            state = TrialState.FAIL if run.get("metric") is None else None
            studies[method].tell(trial, run.get("metric"), state=state)  # None: complete, or failed if not finite

    rows = best_per_technique(runs, cfg.methods)
    table = table_markdown(rows, cfg)
    logger.info("sweep %s: %d experiments\n%s", sweep_id, len(runs), table)
    create_markdown_artifact(key="qrb-sweep", markdown=table,
                             description=f"Sweep {sweep_id} in {ws}: {len(runs)} experiments (dvc exp show)")
    create_table_artifact(key="qrb-sweep-runs", table=[
        {"experiment": r["name"], **{k: fmt_value(v) for k, v in r["params"].items()},
         cfg.metric_key: r.get("metric"), "error": r.get("error") or ""} for r in runs])
    if all(r.get("error") for r in runs):
        raise RuntimeError(f"every experiment of sweep {sweep_id} failed: {runs[0].get('error') if runs else ''}")
    best = best_run(runs)  # None when no run has the metric (no eval set): no run is "best"
    if best and apply_best and cfg.mode == "sequential":
        wsp.run(dvc("exp", "apply", best["name"]), ws)
        logger.info("workspace now holds the best experiment, %s", best["name"])
    return {"workspace": str(ws), "sweep": sweep_id, "runs": runs, "best": best and best["name"], "table": table}


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description="Technique x hyper-parameter sweep as DVC experiments (+ Optuna)")
    ap.add_argument("--workspace", default=".", help="the workspace to sweep in (default .: the repo, the flagship)")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="the sweep's grid and search (default flows/sweep.yaml)")
    ap.add_argument("--profile", help="prepare --workspace as a scratch workspace for this profile (tiny: offline)")
    ap.add_argument("--ports", help="tiny profile: mirror,endpoint ports (default: the profile's)")
    ap.add_argument("--trials", type=int, help="Optuna trials after the grid (default: the config's)")
    ap.add_argument("-S", "--set-param", action="append", default=[], metavar="KEY=VALUE",
                    help="baseline param override for every experiment (repeatable)")
    ap.add_argument("--apply-best", action="store_true", help="end with `dvc exp apply <best>` in the workspace")
    ap.add_argument("--force", action="store_true", help="with --profile: refresh the workspace even over edits")
    args = ap.parse_args(argv)
    try:
        overrides = parse_set(args.set_param)
        ports = [int(p) for p in args.ports.split(",")] if args.ports else None
        load_config(args.config, args.trials)
        if args.profile:
            wsp.check_target(args.workspace, force=args.force)
    except (ValueError, ConfigError) as e:
        raise SystemExit(f"sweep: {e}") from None
    result = sweep(args.workspace, args.config, args.profile, overrides or None, args.trials, ports, args.apply_best,
                   args.force)
    print(result["table"])


if __name__ == "__main__":
    main()
