"""The pipeline flow against a real local Prefect server (isolated PREFECT_HOME) on a toy DVC workspace.

The toy dvc.yaml (scrape -> validate -> train) runs in well under a second per stage: its scrape fails the first
`scrape.fail_times` runs (a counter file outside the workspace), its validate gate fails on `validate.fail: true`,
and it reads params through `qrb.params.load_stage_params`, so bad params fail exactly like a real stage's do.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows import pipeline as pl
from flows.workspace import dvc, run

TOY = '''
import json, sys
from dataclasses import dataclass
from pathlib import Path
from qrb.errors import ConfigError
from qrb.stage import load_section


def load_stage_params(section, cls):
    try:
        return load_section(section, cls)
    except ConfigError as e:
        raise SystemExit(f"{section}: {e}")

@dataclass(frozen=True)
class Scrape:
    counter: str
    fail_times: int

@dataclass(frozen=True)
class Validate:
    fail: bool

@dataclass(frozen=True)
class Train:
    scale: float

stage = sys.argv[1]
for d in ("out", "metrics", "plots", "reports/data_docs"):
    Path(d).mkdir(parents=True, exist_ok=True)
if stage == "scrape":
    _, p = load_stage_params("scrape", Scrape)
    counter = Path(p.counter)
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n <= p.fail_times:
        print(f"attempt {n}: connection refused", flush=True)
        raise SystemExit(f"scrape: mirror unreachable (attempt {n})")
    Path("out/scrape.txt").write_text("papers\\n")
elif stage == "validate":
    _, p = load_stage_params("validate", Validate)
    Path("reports/data_docs/index.html").write_text("<html>data docs</html>")
    Path("metrics/validate.json").write_text(json.dumps({"rows_in": 10, "passed": not p.fail}))
    if p.fail:
        raise SystemExit("validate: gate failed: 4 of 10 rows fail (max 20%)")
    Path("out/validate.txt").write_text("clean\\n")
else:
    _, p = load_stage_params("train", Train)
    Path("out/model.txt").write_text("weights\\n")
    Path("metrics/train.json").write_text(json.dumps({"method": "lora", "eval_ce": round(2.5 * p.scale, 4)}))
    Path("plots/loss.csv").write_text("step,loss\\n1,3.0\\n2,2.0\\n")
'''

DVC_YAML = '''
stages:
  scrape:
    cmd: python toy.py scrape
    deps: [toy.py]
    params: [scrape.counter, scrape.fail_times]
    outs: [out/scrape.txt]
  validate:
    cmd: python toy.py validate
    deps: [toy.py, out/scrape.txt]
    params: [validate.fail]
    outs:
      - out/validate.txt
      - reports/data_docs:
          cache: false
    metrics:
      - metrics/validate.json:
          cache: false
  train:
    cmd: python toy.py train
    deps: [toy.py, out/validate.txt]
    params: [train.scale]
    outs: [out/model.txt]
    metrics:
      - metrics/train.json:
          cache: false
    plots:
      - plots/loss.csv:
          cache: false
          x: step
          y: loss
'''


def make_toy(root: Path, fail_times: int = 0, fail_gate: bool = False) -> Path:
    ws = root / "ws"
    ws.mkdir()
    (ws / "toy.py").write_text(TOY)
    (ws / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (ws / "params.yaml").write_text(
        "# toy params (comments survive overrides)\n"
        + yaml.safe_dump({"base": {"seed": 0, "model": "none", "system_prompt": "", "hf_offline": True,
                                   "max_length": 64},
                          "scrape": {"counter": str(root / "counter"), "fail_times": fail_times},
                          "validate": {"fail": fail_gate}, "train": {"scale": 1.0}}, sort_keys=False))
    (ws / ".gitignore").write_text("/out\n")
    run(["git", "init", "-q", "-b", "main"], ws)
    run(["git", "config", "user.email", "t@t"], ws)
    run(["git", "config", "user.name", "t"], ws)
    run(dvc("init", "-q"), ws)
    commit(ws, "toy")
    return ws


def commit(ws: Path, msg: str) -> None:
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-q", "-m", msg, "--allow-empty"], ws)


def task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


def test_each_stage_is_a_task_run_and_flaky_stage_is_retried(prefect_server, tmp_path):
    ws = make_toy(tmp_path, fail_times=2)
    state = pl.pipeline(str(ws), retry_backoff_s=0.1, return_state=True)
    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    stage_runs = {name: r for name, r in runs.items() if name in ("scrape", "validate", "train")}
    assert set(stage_runs) == {"scrape", "validate", "train"}
    assert all(r.state.type.value == "COMPLETED" for r in stage_runs.values())
    assert runs["scrape"].run_count == 3  # failed twice, then succeeded
    assert runs["validate"].run_count == 1 and runs["train"].run_count == 1
    assert (tmp_path / "counter").read_text() == "3"
    results = {r["stage"]: r for r in state.result()}
    assert results["train"]["ran"]


def test_validate_gate_failure_fails_flow_without_retry(prefect_server, tmp_path):
    ws = make_toy(tmp_path, fail_gate=True)
    # the default policy gives validate no retries: a gate failure is deterministic
    state = pl.pipeline(str(ws), retry_backoff_s=0.1, return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["validate"].state.type.value == "FAILED"
    assert runs["validate"].run_count == 1
    assert "train" not in runs  # nothing downstream of the gate ran
    assert not (ws / "out" / "model.txt").exists()
    assert "gate failed" in runs["validate"].state.message
    # the report is still published: Data Docs explain why the gate failed
    arts = artifacts(state.state_details.flow_run_id)
    assert "reports/data_docs/index.html](file://" in arts["qrb-data-docs"].data
    assert "Failed" in arts["qrb-metrics"].data


def test_bad_params_on_network_stage_are_not_retried(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    state = pl.pipeline(str(ws), params={"scrape.fail_times": "many"}, retry_backoff_s=0.1, return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["scrape"].run_count == 1  # scrape has 3 retries for transient failures, none for bad params
    assert "bad params" in runs["scrape"].state.message
    # the override was written the way `dvc exp run -S` does it, comments kept
    text = (ws / "params.yaml").read_text()
    assert "fail_times: many" in text and text.startswith("# toy params")


def test_unknown_override_key_fails_before_any_stage(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    state = pl.pipeline(str(ws), params={"train.sclae": 2.0}, return_state=True)
    assert state.is_failed()
    assert "train.sclae" in state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert not {"scrape", "validate", "train"} & set(runs)
    assert not (tmp_path / "counter").exists()


def test_artifacts_readable_through_api_with_metrics_diff(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    first = pl.pipeline(str(ws), return_state=True)
    assert first.is_completed()
    commit(ws, "run 1")  # the previous run, as `qrb demo` commits it
    # the weekly refresh's shape: a forced scrape (same papers) plus a param change for train
    second = pl.pipeline(str(ws), params={"train.scale": 2.0}, force=["scrape"], return_state=True)
    assert second.is_completed()
    results = {r["stage"]: r["ran"] for r in second.result()}
    assert results == {"scrape": True, "validate": False, "train": True}  # DVC re-ran only what changed
    arts = artifacts(second.state_details.flow_run_id)
    assert {"qrb-metrics", "qrb-metrics-diff", "qrb-links", "qrb-data-docs", "qrb-plots"} <= set(arts)
    metrics = arts["qrb-metrics"].data
    assert "| metrics/train.json | eval_ce | 5.0 |" in metrics
    diff = arts["qrb-metrics-diff"].data
    assert "metrics/train.json" in diff and "eval_ce" in diff and "2.5" in diff and "5.0" in diff
    assert (ws / pl.PLOTS_DIR / "index.html").exists()
    assert (ws / pl.PLOTS_DIR / "index.html").as_uri() in arts["qrb-plots"].data
    assert "[Data Docs](file://" in arts["qrb-links"].data


def test_parse_set_reads_values_as_yaml():
    assert pl.parse_set(["train.lora.r=4", "train.learning_rate=1e-4", "train.method=dora", "x.y=[a, b]"]) == {
        "train.lora.r": 4, "train.learning_rate": 1e-4, "train.method": "dora", "x.y": ["a", "b"]}
    with pytest.raises(ValueError, match="key=value"):
        pl.parse_set(["train.lora.r"])


def test_stream_timeout_kills_a_silent_command(tmp_path):
    import logging

    with pytest.raises(pl.StageFailed, match="timed out after 1 s"):
        pl.stream([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, 1, logging.getLogger("t"))


def test_weekly_refresh_deployment_schedule_registered(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.deploy import WEEKLY_CRON, build_deployments

    weekly, on_demand = build_deployments(str(tmp_path), timezone="Europe/Vienna")
    assert weekly.parameters == {"workspace": str(tmp_path), "force": ["scrape"]}
    assert not on_demand.schedules
    weekly.apply()  # registers it with the server, as `serve` does, without starting the long-lived runner
    with get_client(sync_client=True) as client:
        registered = client.read_deployment_by_name("qrb-pipeline/weekly-refresh")
    [schedule] = registered.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (WEEKLY_CRON, "Europe/Vienna")
    assert registered.parameters["force"] == ["scrape"]
    assert registered.entrypoint == "flows/pipeline.py:pipeline"
