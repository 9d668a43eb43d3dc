"""Deployments of the pipeline flow: a weekly refresh served from this machine, or runs on a work pool (GPU worker).

    python -m flows.deploy serve [--workspace .] [--cron "0 6 * * 1"] [--timezone UTC]
    python -m flows.deploy pool --pool gpu [--source https://github.com/<you>/quantum-research-bot.git]

`serve` registers two deployments with the Prefect server (PREFECT_API_URL, e.g. a `prefect server start` on
127.0.0.1:4200) and runs them in this process until Ctrl-C:
  - `qrb-pipeline/weekly-refresh`, on the cron schedule: `dvc repro -f scrape` (the crawler is incremental, so a
    forced crawl fetches only new papers), then the other stages as `dvc repro`, which re-runs generate, validate,
    train and evaluate only if papers.jsonl changed;
  - `qrb-pipeline/on-demand`, no schedule: `prefect deployment run qrb-pipeline/on-demand -p params='{...}'`.
`pool` registers `qrb-pipeline/gpu` on a work pool instead, so a worker on another machine (the GPU box) runs it:
see the README section "Running on a GPU worker".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prefect.schedules import Cron

from flows.pipeline import pipeline

REPO_ROOT = Path(__file__).resolve().parent.parent
WEEKLY_CRON = "0 6 * * 1"  # Mondays 06:00: the journal publishes through the week
ENTRYPOINT = "flows/pipeline.py:pipeline"


def refresh_parameters(workspace: str) -> dict[str, Any]:
    return {"workspace": workspace, "force": ["scrape"]}


def build_deployments(workspace: str = ".", cron: str = WEEKLY_CRON, timezone: str = "UTC") -> list[Any]:
    """The served deployments (RunnerDeployment objects; nothing is registered until `serve`)."""
    workspace = str(Path(workspace).resolve())
    weekly = pipeline.to_deployment(
        name="weekly-refresh", schedules=[Cron(cron, timezone=timezone)], parameters=refresh_parameters(workspace),
        description="Weekly refresh: re-crawl (dvc repro -f scrape); DVC re-runs downstream stages only if the "
                    "papers changed.", tags=["qrb", "refresh"])
    on_demand = pipeline.to_deployment(
        name="on-demand", parameters={"workspace": workspace},
        description="The pipeline with optional param overrides (`params`, as dvc exp run -S).", tags=["qrb"])
    return [weekly, on_demand]


def deploy_to_pool(pool: str, source: str = str(REPO_ROOT), workspace: str = ".", cron: str | None = None,
                   timezone: str = "UTC", env: dict[str, str] | None = None) -> Any:
    """Register `qrb-pipeline/gpu` on work pool `pool`; a worker pulls `source` (git URL or a path it can read)."""
    flow = pipeline.from_source(source=source, entrypoint=ENTRYPOINT)
    return flow.deploy(
        name="gpu", work_pool_name=pool,
        parameters=refresh_parameters(workspace) if cron else {"workspace": workspace},
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        job_variables={"env": env or {}}, tags=["qrb", "gpu"], build=False, push=False, print_next_steps=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve or deploy the pipeline flow")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="weekly refresh + on-demand deployments, run by this process")
    s.add_argument("--workspace", default=".", help="the workspace the runs use (default .)")
    s.add_argument("--cron", default=WEEKLY_CRON, help=f"the weekly refresh's schedule (default {WEEKLY_CRON!r})")
    s.add_argument("--timezone", default="UTC", help="timezone of --cron (default UTC)")
    p = sub.add_parser("pool", help="register the pipeline on a work pool (a GPU worker runs it)")
    p.add_argument("--pool", required=True, help="the work pool (`prefect work-pool create NAME --type process`)")
    p.add_argument("--source", default=str(REPO_ROOT), help="git URL (or path on the worker) of the project")
    p.add_argument("--workspace", default=".", help="workspace on the worker, relative to the checkout")
    p.add_argument("--cron", help="also schedule it there (e.g. the weekly refresh)")
    p.add_argument("--timezone", default="UTC", help="timezone of --cron (default UTC)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for the run, e.g. --env CUDA_VISIBLE_DEVICES=0 (no secrets: set those on the worker)")
    args = ap.parse_args(argv)
    if args.command == "serve":
        from prefect import serve

        serve(*build_deployments(args.workspace, args.cron, args.timezone))
    else:
        env = dict(item.partition("=")[::2] for item in args.env)
        deployment_id = deploy_to_pool(args.pool, args.source, args.workspace, args.cron, args.timezone, env)
        print(f"deployment qrb-pipeline/gpu ({deployment_id}) on work pool {args.pool!r}; start a worker with\n"
              f"  prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
