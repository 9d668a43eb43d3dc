"""Deployments of the pipeline flow: a weekly refresh served from this machine, or runs on a work pool (GPU worker).

    qrb deploy serve [--workspace .] [--cron "0 6 * * 1"] [--timezone UTC]
    qrb deploy pool --pool gpu --source https://github.com/<you>/quantum-research-bot.git --workspace /abs/path/on/worker

`serve` runs `qrb-pipeline/weekly-refresh` (`dvc repro -f scrape`, then what changed) and `qrb-pipeline/on-demand` in
this process; `pool` registers `qrb-pipeline/gpu` for a worker. Both need a Prefect server that outlives the command
(PREFECT_API_URL). The steps and why: docs/orchestration.md ("Deployments").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL

from flows.pipeline import fail, pipeline, stage_order
from flows.server import healthy
from qrb.errors import ConfigError
from qrb.params import read_yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
WEEKLY_CRON = "0 6 * * 1"  # Mondays 06:00: the journal publishes through the week
ENTRYPOINT = "flows/pipeline.py:pipeline"
START_SERVER = ("start one (`prefect server start`) and `export PREFECT_API_URL=http://127.0.0.1:4200/api`; "
                "the deployments live there and the workers poll it")


def refresh_parameters(workspace: str) -> dict[str, Any]:
    return {"workspace": workspace, "force": ["scrape"]}


def require_server() -> str:
    """The URL of the Prefect server the deployments go to; a ConfigError when none answers."""
    url = os.environ.get("PREFECT_API_URL", PREFECT_API_URL.value()) or ""
    if not url:
        raise ConfigError(f"no Prefect server: PREFECT_API_URL is not set; {START_SERVER}")
    if not healthy(url, timeout=5.0):
        raise ConfigError(f"no Prefect server answers at {url} (PREFECT_API_URL); {START_SERVER}")
    return url


def check_generate_key(workspace: str) -> None:
    """The weekly refresh re-runs generate whenever the crawl finds papers: its key variable must be set here."""
    stage_order(Path(workspace))  # a folder without a pipeline: one line naming it
    params = Path(workspace) / "params.yaml"
    name = ((read_yaml(params).get("generate") or {}).get("api_key_env") or "") if params.is_file() else ""
    if name and not os.environ.get(name):
        raise ConfigError(f"${name} is not set (generate.api_key_env): each refresh that finds new papers would fail "
                          f"at generate; export it, or for the offline stand-ins run `qrb services -- qrb deploy "
                          f"serve` in the workspace")


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


def is_git(source: str) -> bool:
    """A git URL (https/ssh/git, `git@host:path`, or ending in .git; Prefect would download a bare https URL)."""
    u = urlparse(source)
    return (u.scheme in ("http", "https", "ssh", "git") or source.rstrip("/").endswith(".git")
            or (not u.scheme and "@" in source.split(":", 1)[0] and ":" in source))


def worker_workspace(source: str, workspace: str) -> str:
    """The worker's workspace: absolute for a git source (its checkout is temporary), else inside the local source."""
    if is_git(source):
        if not PurePosixPath(workspace).is_absolute():
            raise ConfigError(f"--workspace {workspace!r}: with a git --source it must be an absolute path on the "
                              "worker (each run checks the code out into a temporary folder deleted afterwards; the "
                              "workspace's outputs, DVC cache and crawl seen-set must persist), e.g. the worker's "
                              "clone: --workspace /home/you/quantum-research-bot")
        return workspace
    return str((Path(source) / workspace).resolve())


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {item}: expected NAME=VALUE")
        env[name] = value
    return env


def deploy_to_pool(pool: str, source: str = str(REPO_ROOT), workspace: str = ".", cron: str | None = None,
                   timezone: str = "UTC", env: dict[str, str] | None = None) -> Any:
    """Register `qrb-pipeline/gpu` on work pool `pool`; a worker checks out `source` for each run."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.runner.storage import GitRepository

    workspace = worker_workspace(source, workspace)
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ConfigError(f"no work pool {pool!r} on the server: create it with "
                              f"`prefect work-pool create {pool} --type process`") from None
    try:  # the flow is loaded from the source (cloned here too) for its parameters and description
        flow = pipeline.from_source(source=GitRepository(url=source) if is_git(source) else source,
                                    entrypoint=ENTRYPOINT)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"cannot read --source {source}: {' '.join(str(e).split())}") from None
    return flow.deploy(
        name="gpu", work_pool_name=pool,
        parameters=refresh_parameters(workspace) if cron else {"workspace": workspace},
        schedules=[Cron(cron, timezone=timezone)] if cron else None,
        job_variables={"env": env or {}}, tags=["qrb", "gpu"], build=False, push=False, print_next_steps=False,
        ignore_warnings=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qrb deploy", description="Serve or deploy the pipeline flow (to the Prefect "
                                                                "server at PREFECT_API_URL)")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="weekly refresh + on-demand deployments, run by this process")
    s.add_argument("--workspace", default=".", help="the workspace the runs use (default .)")
    s.add_argument("--cron", default=WEEKLY_CRON, help=f"the weekly refresh's schedule (default {WEEKLY_CRON!r})")
    s.add_argument("--timezone", default="UTC", help="timezone of --cron (default UTC)")
    p = sub.add_parser("pool", help="register the pipeline on a work pool (a GPU worker runs it)")
    p.add_argument("--pool", required=True, help="the work pool (`prefect work-pool create NAME --type process`)")
    p.add_argument("--source", default=str(REPO_ROOT),
                   help="git URL of the project the worker checks out per run (default: this folder, read in place)")
    p.add_argument("--workspace", default=".",
                   help="the workspace on the worker: an absolute path with a git --source (default . = the source)")
    p.add_argument("--cron", help="also schedule it there (e.g. the weekly refresh)")
    p.add_argument("--timezone", default="UTC", help="timezone of --cron (default UTC)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for the run, e.g. --env CUDA_VISIBLE_DEVICES=0 (no secrets: set those on the worker)")
    args = ap.parse_args(argv)
    try:
        url = require_server()
        if args.command == "serve":
            from prefect import serve

            check_generate_key(args.workspace)
            serve(*build_deployments(args.workspace, args.cron, args.timezone))
            return
        deployment_id = deploy_to_pool(args.pool, args.source, args.workspace, args.cron, args.timezone,
                                       parse_env(args.env))
    except ConfigError as e:
        fail("qrb deploy", e)
    print(f"deployment qrb-pipeline/gpu ({deployment_id}) on work pool {args.pool!r} at {url}; start a worker with\n"
          f"  prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
