"""The deployments end to end, as a user runs them across machines, here on one: a real Prefect server (`prefect server
start` on a free port, its own PREFECT_HOME), a `process` work pool and a `prefect worker start` subprocess, shared by
the tests of this file; the deployments made by the project's own commands (`qrb deploy serve`, `qrb deploy pool
--source <a git clone of this tree>`), triggered through the API, their artifacts read back through it.

The data is the tiny profile on an offline mirror of 2 papers that gains one while running (`Mirror.add_record`; it
counts the requests per path), the smoke endpoint, one train step. The runs stop after evaluate (`until`): model_card
and export add nothing to what is tested here and cost a minute a run. The tests share one workspace, in order (each
also runs alone): the pool deployment's run is its first run, the weekly refresh then sees the mirror gain a paper and
then nothing, the sweep queues its experiments on the data the refresh left.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows.workspace import REPO_ROOT, dvc, run, venv_env

pytestmark = pytest.mark.slow

POOL = "qrb-test-pool"
STARTUP_S = 180.0      # a first `prefect server start` migrates its database: ~30 s on a busy 2-core machine
RUN_TIMEOUT_S = 900.0  # one pipeline run (until evaluate) on the tiny data: ~1-2 minutes
SMALL = {  # 2 papers, ~5 facts each: the gates opened, one train step, the cheapest evaluate
    "generate.pairs_per_prompt": 1, "generate.eval_size": 5, "generate.eval_max_paper_share": 1.0,
    "validate.min_rows": 1, "validate.max_paper_share": 1.0, "validate.min_eval_rows": 1,
    "validate.max_eval_fraction": 1.0, "validate.min_similarity": 0.0, "train.epochs": 1, "train.checkpoint_steps": 0,
    "train.emissions_country": None, "evaluate.max_new_tokens": 4, "evaluate.rag": False,
    "evaluate.bootstrap_samples": 100}
UNTIL = {"until": "evaluate"}
# what the stages after scrape write: rewritten when they run, untouched when DVC skips them
OUTPUTS = {"generate": "artifacts/generate/train.jsonl", "validate": "artifacts/validate/train.jsonl",
           "train": "artifacts/train/adapter/adapter_model.safetensors", "train metrics": "metrics/train.json",
           "evaluate": "artifacts/evaluate/predictions.jsonl", "evaluate metrics": "metrics/evaluate.json"}


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A long-lived child in its own process group (stopped with everything it started), its output in `log`."""
    with log.open("w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # children that outlived their leader (a flow run)
        os.killpg(proc.pid, signal.SIGKILL)


def tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def bin_(name: str) -> str:
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def prefect(tmp_path_factory):
    """A Prefect server, a process work pool and a worker polling it; this process's client points at the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.server import healthy, using
    from standins.services import SMOKE_KEY_VALUE, free_ports

    root = tmp_path_factory.mktemp("deploy")
    url = f"http://127.0.0.1:{free_ports(1)[0]}/api"
    # the smoke endpoint's key: in the environment of what runs the flows, as a user's worker has its keys
    env = venv_env({"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_API_URL": url, "OMP_NUM_THREADS": "1",
                    "QRB_CPU_THREADS": "1", "QRB_SMOKE_API_KEY": SMOKE_KEY_VALUE,
                    "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"})
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    procs = []
    try:
        server_log = root / "server.log"
        server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                        url.split(":")[2].split("/")[0]], server_log, server_env, root)
        procs.append(server)
        deadline = time.time() + STARTUP_S
        while not healthy(url):
            assert server.poll() is None, f"prefect server exited:\n{tail(server_log)}"
            assert time.time() < deadline, f"prefect server not up in {STARTUP_S:.0f} s:\n{tail(server_log)}"
            time.sleep(0.5)
        with using(url):
            with get_client(sync_client=True) as client:
                client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
            (root / "worker").mkdir()
            worker_log = root / "worker.log"
            procs.append(start([bin_("prefect"), "worker", "start", "--pool", POOL], worker_log, env,
                               root / "worker"))
            yield SimpleNamespace(url=url, env=env, root=root, worker_log=worker_log)
    finally:
        for proc in reversed(procs):
            stop(proc)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A git URL of this working tree as it is now (tracked and new files, not the ignored ones): a bare clone, so
    the worker clones it for each run as it would clone GitHub."""
    root = tmp_path_factory.mktemp("source")
    tree = root / "tree"
    files = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], REPO_ROOT).stdout.split("\0")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, tree / name)
    run(["git", "init", "-q", "-b", "main"], tree)
    run(["git", "add", "-A"], tree)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "snapshot"], tree)
    run(["git", "clone", "-q", "--bare", str(tree), str(root / "quantum-research-bot.git")], root)
    return str(root / "quantum-research-bot.git")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model_dir, prefect):
    """A tiny-profile workspace crawling a 2-paper mirror (in this process, so the test can add papers and count
    requests) and generating from the smoke endpoint."""
    from flows import workspace as wsp
    from qrb.params import deep_merge, nested
    from standins.mirror import serve_mirror
    from standins.services import background, free_ports, port_overrides

    root = tmp_path_factory.mktemp("tiny")
    records = [json.loads(line) for line in (REPO_ROOT / "data/corpus/quantum-papers.jsonl").read_text().splitlines()
               if line.strip()]
    window = [r for r in records if "2024-07-01" <= (r.get("published") or "") <= "2024-12-31"]
    (root / "corpus").mkdir()
    (root / "corpus" / "quantum-papers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in window[:2]))
    with serve_mirror(root / "corpus", port=0) as mirror:
        endpoint_port = free_ports(1)[0]
        params = wsp.profile_params("tiny")
        params = deep_merge(params, port_overrides(params, int(mirror.url.rsplit(":", 1)[1]), endpoint_port))
        params = deep_merge(params, nested({**SMALL, "base.model": str(tiny_model_dir)}))
        ws = wsp.prepare(root / "ws", "tiny", overrides=params)
        with background("smoke-test endpoint", ["-m", "standins.smoke", "--port", str(endpoint_port)],
                        params["generate"]["base_url"], ws):
            yield SimpleNamespace(ws=ws, mirror=mirror, more=window[2:])


def wait_for_deployment(name: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120.0):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"`qrb deploy serve` exited ({proc.returncode}):\n{tail(log)}"
        with get_client(sync_client=True) as client, contextlib.suppress(ObjectNotFound):
            return client.read_deployment_by_name(name)
        assert time.time() < deadline, f"{name} not registered in {timeout_s:.0f} s:\n{tail(log)}"
        time.sleep(1)


def trigger(name: str, log: Path, parameters: dict | None = None):
    """Run a deployment through the API, as `prefect deployment run` does, and wait for it to finish."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name, parameters=parameters or UNTIL, timeout=RUN_TIMEOUT_S)
    assert flow_run.state.is_completed(), f"{name}: {flow_run.state.type}: {flow_run.state.message}\n{tail(log)}"
    return flow_run


def stamps(ws: Path) -> dict[str, int]:
    return {name: (ws / path).stat().st_mtime_ns for name, path in OUTPUTS.items()}


def artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def flow_run_logs(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(entry.message for entry in logs)


def test_pool_deployment_runs_on_a_worker_from_the_git_source(prefect, tiny, source):
    from prefect.client.orchestration import get_client

    from flows.deploy import WEEKLY_CRON

    ws = tiny.ws
    proc = subprocess.run([bin_("qrb"), "deploy", "pool", "--pool", POOL, "--source", source, "--workspace", str(ws),
                           "--cron", WEEKLY_CRON, "--env", "QRB_TEST_MARK=from-deploy"],
                          cwd=prefect.root, env=prefect.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on work pool {POOL!r}" in proc.stdout
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("qrb-pipeline/gpu")
    assert deployment.work_pool_name == POOL
    assert deployment.parameters == {"workspace": str(ws), "force": ["scrape"]}
    assert [step["prefect.deployments.steps.git_clone"]["repository"] for step in deployment.pull_steps] == [source]
    assert deployment.job_variables["env"] == {"QRB_TEST_MARK": "from-deploy"}

    flow_run = trigger("qrb-pipeline/gpu", prefect.worker_log)  # the workspace's first run
    assert all(tiny.mirror.counts[p] == 1 for p in tiny.mirror.papers), dict(tiny.mirror.counts)
    assert (ws / OUTPUTS["evaluate"]).exists() and (ws / OUTPUTS["train"]).exists()
    logs = flow_run_logs(flow_run.id)
    assert "Executing deployment step: git_clone" in logs  # the worker ran it from its own checkout
    assert f"$ dvc --wait-for-lock repro --force --single-item scrape  (in {ws})" in logs  # the weekly refresh
    published = artifacts(flow_run.id)
    assert {"qrb-metrics", "qrb-metrics-diff", "qrb-links"} <= set(published), sorted(published)
    assert "eval_ce" in published["qrb-metrics"].data


def test_weekly_refresh_fetches_only_new_papers_and_retrains_only_when_they_change(prefect, tiny):
    from flows.deploy import WEEKLY_CRON

    ws, mirror = tiny.ws, tiny.mirror
    log = prefect.root / "serve.log"
    serve = start([bin_("qrb"), "deploy", "serve", "--workspace", str(ws)], log, prefect.env, prefect.root)
    try:
        weekly = wait_for_deployment("qrb-pipeline/weekly-refresh", serve, log)
        [schedule] = weekly.schedules
        assert schedule.schedule.cron == WEEKLY_CRON and weekly.parameters == {"workspace": str(ws),
                                                                               "force": ["scrape"]}
        if not (ws / OUTPUTS["evaluate"]).exists():  # the first run (the pool test above made it, when it ran)
            trigger("qrb-pipeline/weekly-refresh", log)
        old = sorted(mirror.papers)
        assert len(old) == 2 and all(mirror.counts[p] == 1 for p in old), dict(mirror.counts)
        first = stamps(ws)

        new = mirror.add_record(tiny.more[0])
        trigger("qrb-pipeline/weekly-refresh", log)
        assert mirror.counts[new] == 1 and all(mirror.counts[p] == 1 for p in old), dict(mirror.counts)
        assert len((ws / "artifacts/scrape/papers.jsonl").read_text().splitlines()) == 3
        second = stamps(ws)
        assert all(second[k] != first[k] for k in OUTPUTS), (first, second)  # new papers: every later stage re-ran
        trained = (ws / OUTPUTS["train"]).read_bytes()

        listing = mirror.counts["/papers/"]
        trigger("qrb-pipeline/weekly-refresh", log)
        assert mirror.counts["/papers/"] == listing + 1  # the crawl did run (forced)...
        assert all(mirror.counts[p] == 1 for p in [*old, new]), dict(mirror.counts)  # ...and fetched no paper
        assert stamps(ws) == second  # unchanged papers: generate, validate, train, evaluate skipped
        assert (ws / OUTPUTS["train"]).read_bytes() == trained
    finally:
        stop(serve)


def test_pool_deploy_names_a_missing_pool_and_an_unreadable_source(prefect, tmp_path):
    from flows import deploy
    from qrb.errors import ConfigError

    with pytest.raises(ConfigError, match="no work pool 'nopool'.*prefect work-pool create nopool --type process"):
        deploy.deploy_to_pool("nopool", str(tmp_path / "qrb.git"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"cannot read --source .*nothere\.git"):
        deploy.deploy_to_pool(POOL, str(tmp_path / "nothere.git"), str(tmp_path))


def test_sweep_queue_mode_runs_queued_experiments_and_prints_the_table(prefect, tiny, tmp_path):
    config = tmp_path / "sweep.yaml"
    config.write_text("target: train\nmetric: {file: metrics/train.json, key: eval_ce}\nmode: queue\njobs: 2\n"
                      "grid:\n  train.method: [lora, dora]\n  train.lora.r: [4]\n  train.learning_rate: [1.0e-4]\n"
                      "search: {trials: 0}\n")
    proc = subprocess.run([bin_("qrb"), "sweep", "--workspace", str(tiny.ws), "--config", str(config)],
                          cwd=tmp_path, env=prefect.env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = {m["method"]: m for m in re.finditer(
        r"^\| (?P<method>lora|dora) \| (?P<ce>[0-9.]+) \| 4 \| 0\.0001 \| (?P<name>\S+) \| 1 \|$", proc.stdout, re.M)}
    assert set(rows) == {"lora", "dora"}, proc.stdout
    assert all(math.isfinite(float(m["ce"])) and float(m["ce"]) > 0 for m in rows.values())
    shown = json.dumps(json.loads(run(dvc("exp", "show", "--json"), tiny.ws).stdout))
    for method, m in rows.items():  # each point ran as a DVC experiment with its own params
        assert f'"name": "{m["name"]}"' in shown, method
