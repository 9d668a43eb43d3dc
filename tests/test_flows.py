"""The pipeline flow against a real local Prefect server (isolated PREFECT_HOME) on a toy DVC workspace.

The toy dvc.yaml (scrape -> validate -> train) runs in well under a second per stage. Its stages are wired as real
ones are (`qrb.stage.run_stage`, the `qrb.errors` classes), so they report their outcome the same way: its scrape
fails the first `scrape.fail_times` runs (a counter file outside the workspace) with a TransientError ("mirror
unreachable") or, with `scrape.fail_with: config`, a ConfigError (a missing API key); its validate gate raises a
DataError on `validate.fail: true`; bad params are a ConfigError from `run_stage` itself.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows import artifacts as fa
from flows import pipeline as pl
from flows.workspace import REPO_ROOT, dvc, run

TOY = '''
"""A toy stage wired like a real one: python toy.py <scrape|validate|train>."""
import json, sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from qrb.errors import ConfigError, DataError, TransientError
from qrb.stage import run_stage


@dataclass(frozen=True)
class Scrape:
    counter: str
    fail_times: int
    fail_with: Literal["transient", "config"]


@dataclass(frozen=True)
class Validate:
    fail: bool


@dataclass(frozen=True)
class Train:
    scale: float


def scrape(base, p, args):
    # stages log their params; a line like this one used to turn every failure into "bad params"
    print(f"scrape: params: fail_times={p.fail_times} fail_with={p.fail_with}", flush=True)
    counter = Path(p.counter)
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    if n <= p.fail_times:
        if p.fail_with == "config":
            raise ConfigError("API key variable QRB_TOY_KEY is not set")
        print(f"attempt {n}: connection refused", flush=True)
        raise TransientError(f"mirror unreachable (attempt {n})")
    Path("out/scrape.txt").write_text("papers\\n")


def validate(base, p, args):
    Path("reports/data_docs/index.html").write_text("<html>data docs</html>")
    Path("metrics/validate.json").write_text(json.dumps({"rows_in": 10, "passed": not p.fail}))
    if p.fail:
        raise DataError("gate failed: 4 of 10 rows fail (max 20%)")
    Path("out/validate.txt").write_text("clean\\n")


def train(base, p, args):
    print("40%|####      | 4/10 [00:06<00:09,  1.50s/it]", flush=True)  # a long bar, as Trainer draws it
    Path("out/model.txt").write_text("weights\\n")
    Path("metrics/train.json").write_text(json.dumps({"method": "lora", "eval_ce": round(2.5 * p.scale, 4),
                                                          "train_loss": 1.2345678}))
    Path("plots/loss.csv").write_text("step,loss\\n1,3.0\\n2,2.0\\n")


STAGES = {"scrape": (Scrape, scrape), "validate": (Validate, validate), "train": (Train, train)}
for d in ("out", "metrics", "plots", "reports/data_docs"):
    Path(d).mkdir(parents=True, exist_ok=True)
section = sys.argv[1]
run_stage(__doc__, section, STAGES[section][0], (), STAGES[section][1], sys.argv[2:])
'''

DVC_YAML = '''
stages:
  scrape:
    cmd: python toy.py scrape
    deps: [toy.py]
    params: [scrape.counter, scrape.fail_times, scrape.fail_with]
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


def make_toy(root: Path, fail_times: int = 0, fail_gate: bool = False, fail_with: str = "transient") -> Path:
    ws = root / "ws"
    ws.mkdir()
    (ws / "toy.py").write_text(TOY)
    (ws / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    (ws / "params.yaml").write_text(
        "# toy params (comments survive overrides)\n"
        + yaml.safe_dump({"base": {"seed": 0, "model": "none", "system_prompt": "", "hf_offline": True,
                                   "max_length": 64},
                          "scrape": {"counter": str(root / "counter"), "fail_times": fail_times,
                                     "fail_with": fail_with},
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
    state = pl.pipeline(str(ws), retry_delay_s=0.1, return_state=True)
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
    state = pl.pipeline(str(ws), retry_delay_s=0.1, return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["validate"].state.type.value == "FAILED"
    assert runs["validate"].run_count == 1
    assert "train" not in runs  # nothing downstream of the gate ran
    assert not (ws / "out" / "model.txt").exists()
    assert "stage validate failed (data, exit 65, not retried): gate failed: 4 of 10 rows fail (max 20%)" \
        in runs["validate"].state.message
    # the report is still published, headed by the cause; Data Docs explain it
    arts = artifacts(state.state_details.flow_run_id)
    assert "reports/data_docs/index.html](file://" in arts["qrb-data-docs"].data
    assert arts["qrb-metrics"].data.startswith("**Failed**: stage validate failed (data, exit 65, not retried): "
                                               "gate failed: 4 of 10 rows fail (max 20%)\n")


def test_bad_params_on_network_stage_are_not_retried(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    # the toy's stages are no `stages.<x>` module, so the flow cannot check this value before the stage reads it
    state = pl.pipeline(str(ws), params={"scrape.fail_times": "many"}, retry_delay_s=0.1, return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    assert runs["scrape"].run_count == 1  # scrape has 3 retries for transient failures, none for bad params
    assert "stage scrape failed (config, exit 78, not retried): params: `scrape.fail_times` must be an integer" \
        in runs["scrape"].state.message
    # the override was written the way `dvc exp run -S` does it, comments kept
    text = (ws / "params.yaml").read_text()
    assert "fail_times: many" in text and text.startswith("# toy params")


@pytest.mark.parametrize("fail_with", ["transient", "config"])
def test_network_stage_retry_is_decided_by_what_the_stage_reports(prefect_server, tmp_path, fail_with):
    # the same stage, failing twice, with the same "scrape: params: ..." line in its log: only the kind it reports
    # (its status file) decides; a missing API key is no reason to retry, an unreachable mirror is
    ws = make_toy(tmp_path, fail_times=2, fail_with=fail_with)
    state = pl.pipeline(str(ws), until="scrape", retry_delay_s=0.1, return_state=True)
    run = task_runs(state.state_details.flow_run_id)["scrape"]
    if fail_with == "transient":
        assert state.is_completed(), state.message
        assert run.run_count == 3 and (tmp_path / "counter").read_text() == "3"
        return
    assert state.is_failed()
    assert run.run_count == 1 and (tmp_path / "counter").read_text() == "1"
    headline = run.state.message.splitlines()[0]
    assert "config" in headline and "exit 78" in headline and "not retried" in headline
    assert headline.endswith("API key variable QRB_TOY_KEY is not set"), headline
    metrics = artifacts(state.state_details.flow_run_id)["qrb-metrics"].data
    assert metrics.splitlines()[0].endswith("API key variable QRB_TOY_KEY is not set"), metrics


def test_stage_whose_command_never_ran_is_not_retried(prefect_server, tmp_path):
    ws = make_toy(tmp_path, fail_times=5)
    dvc_yaml = ws / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("deps: [toy.py]", "deps: [toy.py, missing.txt]"))
    state = pl.pipeline(str(ws), retry_delay_s=0.1, return_state=True)
    assert state.is_failed()
    run = task_runs(state.state_details.flow_run_id)["scrape"]
    assert run.run_count == 1  # DVC refused (a missing dep): a retry cannot help
    assert not (tmp_path / "counter").exists()
    assert "did not run" in run.state.message.splitlines()[0]


def test_unknown_override_key_fails_before_any_stage(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    before = (ws / "params.yaml").read_text()
    state = pl.pipeline(str(ws), params={"train.sclae": 2.0}, return_state=True)
    assert state.is_failed()
    assert "unknown key `train.sclae` (did you mean `train.scale`?)" in state.message, state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert not {"scrape", "validate", "train"} & set(runs)
    assert not (tmp_path / "counter").exists()
    assert (ws / "params.yaml").read_text() == before
    # a failed run publishes its artifacts, headed by the cause
    metrics = artifacts(state.state_details.flow_run_id)["qrb-metrics"].data
    assert metrics.startswith("**Failed**: params: unknown key `train.sclae` (did you mean `train.scale`?)"), metrics


def real_params_workspace(root: Path) -> Path:
    """The repo's dvc.yaml and params.yaml (its real stages), with an output of generate in place."""
    from helpers import REPO

    ws = root / "ws"
    (ws / "artifacts" / "generate").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        (ws / name).write_text((REPO / name).read_text())
    (ws / "artifacts" / "generate" / "train.jsonl").write_text('{"question": "q"}\n')
    return ws


@pytest.mark.parametrize("override, message", [
    ({"generate.concurrency": "abc"}, "params: `generate.concurrency` must be an integer, got 'abc'"),
    ({"train.lora.r": 4, "train.lora.alhpa": 8}, "params: unknown key `train.lora.alhpa` (did you mean "
                                                 "`train.lora.alpha`?)"),
    ({"base.max_length": 4}, "params: `base.max_length` must be an integer >= 16"),
])
def test_bad_override_is_checked_by_the_stage_params_and_changes_nothing(prefect_server, tmp_path, override, message):
    ws = real_params_workspace(tmp_path)
    state = pl.pipeline(str(ws), params=override, return_state=True)
    assert state.is_failed()
    assert message in state.message, state.message
    assert not set(task_runs(state.state_details.flow_run_id)) & set(pl.stage_order(ws))  # no stage ran
    assert (ws / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()
    assert (ws / "artifacts" / "generate" / "train.jsonl").read_text() == '{"question": "q"}\n'
    metrics = artifacts(state.state_details.flow_run_id)["qrb-metrics"].data
    assert metrics.startswith(f"**Failed**: {message}"), metrics


def test_good_override_rewrites_only_its_line(tmp_path):
    from flows import overrides

    ws = real_params_workspace(tmp_path)
    overrides.check(ws, {"train.lora.r": 4, "scrape.user_agent": "x" * 150})
    overrides.apply(ws / "params.yaml", {"train.lora.r": 4, "scrape.user_agent": "x" * 150})
    old = (REPO_ROOT / "params.yaml").read_text().splitlines()
    new = (ws / "params.yaml").read_text().splitlines()
    assert len(old) == len(new)  # comments kept, nothing re-wrapped
    changed = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(changed) == 2, changed
    assert any("r: 4" in b for _, b in changed) and any("x" * 150 in b for _, b in changed)


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
    assert "| metrics/train.json | eval_ce | 5.0 |" in metrics and "| train_loss | 1.235 |" in metrics  # rounded
    diff = arts["qrb-metrics-diff"].data
    assert "metrics/train.json" in diff and "eval_ce" in diff and "2.5" in diff and "5.0" in diff
    assert (ws / fa.PLOTS_DIR / "index.html").exists()
    assert (ws / fa.PLOTS_DIR / "index.html").as_uri() in arts["qrb-plots"].data
    assert "[Data Docs](file://" in arts["qrb-links"].data


def test_a_long_stage_moves_a_progress_artifact(prefect_server, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

    from flows import console

    def read(artifact_id):
        with get_client(sync_client=True) as client:
            return client.read_artifacts(artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[artifact_id])))[0]

    @flow
    def poll():  # the batch job's bar, as tqdm draws it
        progress = fa.StageProgress("generate")
        progress(console.BAR.search("batch batch_1: 40%|####      | 40/100 [01:07<01:40,  1.68s/request]"))
        return progress.id

    art = read(poll())
    assert (art.key, art.type, art.data) == ("generate-progress", "progress", 40.0)
    assert art.description == "generate: batch batch_1 40% (40/100), 01:07 elapsed, ~01:40 left"

    state = pl.pipeline(str(make_toy(tmp_path)), return_state=True)
    arts = artifacts(state.state_details.flow_run_id)
    assert arts["train-progress"].data == 100.0 and arts["train-progress"].description.startswith("train: done in")
    assert "scrape-progress" not in arts  # no long work: no progress artifact


def test_parse_set_reads_values_as_yaml():
    assert pl.parse_set(["train.lora.r=4", "train.learning_rate=1e-4", "train.method=dora", "x.y=[a, b]"]) == {
        "train.lora.r": 4, "train.learning_rate": 1e-4, "train.method": "dora", "x.y": ["a", "b"]}
    with pytest.raises(ValueError, match="key=value"):
        pl.parse_set(["train.lora.r"])


def test_failures_are_classified_by_the_status_not_the_output():
    tail = ["scrape: params: fail_times=2", "scrape: params: `x` must be an integer", "ERROR: failed to run"]
    transient = pl.stage_failure("stage scrape", 255, {"stage": "scrape", "exit_code": 75, "kind": "transient",
                                                       "message": "mirror unreachable"}, tail)
    assert transient.retryable and (transient.kind, transient.exit_code) == ("transient", 75)
    assert transient.headline == "stage scrape failed (transient, exit 75): mirror unreachable"
    assert pickle.loads(pickle.dumps(transient)).headline == transient.headline  # Prefect may pickle it
    for code, kind in [(78, "config"), (65, "data"), (1, "failed"), (2, "usage")]:
        failure = pl.stage_failure("stage scrape", 255, {"stage": "scrape", "exit_code": code, "message": "m"}, [])
        assert (failure.kind, failure.retryable) == (kind, False)
    # no status: the command never ran; a status of success: DVC failed afterwards. Neither is retried.
    never_ran = pl.stage_failure("stage scrape", 255, None, tail)
    assert (never_ran.kind, never_ran.exit_code, never_ran.retryable) == ("dvc", 255, False)
    assert never_ran.headline.endswith("DVC failed, its command did not run: ERROR: failed to run")
    after = pl.stage_failure("stage scrape", 255, {"stage": "scrape", "exit_code": 0, "message": ""}, [])
    assert (after.kind, after.retryable) == ("dvc", False) and "after its command succeeded" in after.headline
    # an experiment names the stage that failed inside it
    exp = pl.stage_failure("experiment e1", 255, {"stage": "train", "exit_code": 78, "message": "no GPU"}, [])
    assert exp.headline == "experiment e1 failed (config, exit 78, not retried): train: no GPU"


def test_run_stage_reports_every_outcome_in_the_status_file(tmp_path, monkeypatch):
    from dataclasses import dataclass

    from qrb.errors import TransientError
    from qrb.stage import STATUS_ENV, run_stage

    @dataclass(frozen=True)
    class Toy:
        n: int

    def crash(base, p, args):
        raise KeyError("n")

    def flaky(base, p, args):
        raise TransientError("endpoint  down\n(HTTP 503)")

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("base: {seed: 0, model: none, system_prompt: '', hf_offline: true, max_length: 64}\n"
                                         "train: {n: 1}\n")
    status = tmp_path / "status.json"
    monkeypatch.setenv(STATUS_ENV, str(status))
    run_stage("toy", "train", Toy, (), lambda base, p, args: None, [])
    assert pl.read_status(status) == {"stage": "train", "exit_code": 0, "kind": "ok", "message": ""}
    with pytest.raises(SystemExit) as exit_:
        run_stage("toy", "train", Toy, (), flaky, [])
    assert exit_.value.code == 75
    assert pl.read_status(status) == {"stage": "train", "exit_code": 75, "kind": "transient",
                                      "message": "endpoint down (HTTP 503)"}
    with pytest.raises(KeyError):  # a crash keeps its traceback, and is reported as no transient failure
        run_stage("toy", "train", Toy, (), crash, [])
    assert pl.read_status(status) == {"stage": "train", "exit_code": 1, "kind": "failed", "message": "KeyError: 'n'"}
    with pytest.raises(SystemExit) as exit_:
        run_stage("toy", "train", Toy, (), crash, ["--bogus"])
    assert exit_.value.code == 2
    assert pl.read_status(status)["kind"] == "usage" and "--bogus" in pl.read_status(status)["message"]


def test_stream_timeout_kills_a_silent_command(tmp_path):
    import logging

    with pytest.raises(pl.StageFailed, match=r"\(timeout, not retried\): killed after 1 s") as failed:
        pl.stream([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path, 1, logging.getLogger("t"))
    assert not failed.value.retryable


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


def test_task_runs_record_the_dvc_dag_as_their_upstream_inputs(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    state = pl.pipeline(str(ws), params={"train.scale": 2.0}, return_state=True)
    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)

    def upstream(name):
        return {str(ref.id) for ref in runs[name].task_inputs.get("wait_for", [])}

    assert upstream("validate") == {str(runs["scrape"].id)}
    assert upstream("train") == {str(runs["validate"].id)}
    assert upstream("scrape") == {str(runs["set-params"].id)}  # the first stage waits for the params it reads
    # the retry policy renders: one number of seconds (a list shows as "NaN s" in the UI)
    assert runs["scrape"].empirical_policy.retries == pl.NETWORK_STAGES["scrape"]
    assert isinstance(runs["scrape"].empirical_policy.retry_delay, (int, float))


def test_stage_edges_are_the_edges_dvc_dag_draws(tmp_path, repo):
    ws = tmp_path / "dag"
    ws.mkdir()
    (ws / "dvc.yaml").write_text((repo / "dvc.yaml").read_text())
    run(["git", "init", "-q"], ws)
    run(dvc("init", "-q"), ws)
    dot = run(dvc("dag", "--dot"), ws).stdout
    stages = set(pl.stage_order(ws))
    expected = {(a, b) for a, b in (tuple(x.strip().strip('"') for x in line.rstrip(";").split("->"))
                                    for line in dot.splitlines() if "->" in line) if a in stages and b in stages}
    edges = {(up, stage) for stage, ups in pl.stage_edges(ws).items() for up in ups}
    assert expected and edges == expected


def test_failed_run_labels_old_metrics_and_unchanged_diff_says_so(prefect_server, tmp_path):
    ws = make_toy(tmp_path)
    assert pl.pipeline(str(ws), return_state=True).is_completed()
    commit(ws, "run 1")
    again = pl.pipeline(str(ws), return_state=True)  # nothing changed
    assert again.is_completed()
    assert artifacts(again.state_details.flow_run_id)["qrb-metrics-diff"].data == \
        "No metric changed since the last committed run."
    failed = pl.pipeline(str(ws), params={"validate.fail": True}, return_state=True)
    assert failed.is_failed()
    metrics = artifacts(failed.state_details.flow_run_id)["qrb-metrics"].data
    head, _, rest = metrics.partition("\n\n")
    assert head.startswith("**Failed**: stage validate failed (data")
    assert "from the last successful run of each stage (stages this run finished: scrape)" in rest
    assert rest.index("last successful run") < rest.index("| metrics/train.json | eval_ce | 2.5 |")


def test_persistent_server_is_started_once_and_sends_no_telemetry(tmp_path, monkeypatch):
    import os
    import signal
    import time

    from flows import server as srv
    from standins.services import free_ports

    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PREFECT_SERVER_LOGGING_LEVEL", "INFO")  # the server then logs each service it schedules
    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)  # as a user's shell has it: flows set it
    import flows

    importlib.reload(flows)
    api, pid = srv.ensure(url)
    try:
        assert api == url and pid and srv.healthy(url)
        assert srv.ensure(url) == (url, None)  # a server that answers is used, not started again
        log = tmp_path / "home" / "qrb-server.log"
        deadline = time.time() + 60
        while "schedule_recent_deployments" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)  # services are scheduled just after the API answers; telemetry would be among them
        time.sleep(2)
    finally:
        os.killpg(pid, signal.SIGTERM)  # its own session: the demo's Ctrl-C does not reach it, the test stops it
    text = log.read_text()
    assert "Scheduling perpetual service: schedule_recent_deployments" in text, text[-3000:]
    assert "send_telemetry_heartbeat" not in text and "Failed to send telemetry" not in text, text[-3000:]
    assert srv.ui_url(url, "abc") == f"http://127.0.0.1:{port}/runs/flow-run/abc"


TRAIN_OUTPUT = [  # what the train stage writes, as a pipe delivers it (tqdm's \r updates become lines)
    "Map:   0%|          | 0/387 [00:00<?, ? examples/s]",
    "Map: 100%|██████████| 387/387 [00:01<00:00, 300.56 examples/s]",
    "2026-12-01 09:30:48,747 INFO stages.train.trainer: lora_plus: 81984 trainable of 287232 params (28.54%)",
    *(f" {p}%|█         | {round(p * 1.96)}/196 [00:{p // 2:02d}<01:00,  1.2it/s]" for p in range(0, 101)),
    " 10%|█         | 20/196 [00:27<03:28,  1.19s/it]/x/peft/utils/save_and_load.py:327: UserWarning: Setting "
    "`save_embedding_layers` to `True`",
    "  warnings.warn(",
    "/x/peft/utils/save_and_load.py:327: UserWarning: Setting `save_embedding_layers` to `True`",
    "  warnings.warn(",
    "                                             \x1b[A{'eval_loss': '2.941', 'epoch': '1'}",
    "2026-12-01 09:33:29,922 INFO stages.train.run: adapter written to artifacts/train/adapter; eval CE 2.84",
]


def test_stage_output_shows_long_progress_and_the_stage_summary(tmp_path, monkeypatch):
    import io
    import logging

    from flows import console

    out = io.StringIO()
    monkeypatch.setattr(console, "_console", console.Console(out))  # not a terminal: a line at every 20%
    monkeypatch.setattr(console, "GAP_S", 0.0)  # (at most one per GAP_S: tested below)
    script = tmp_path / "emit.py"
    script.write_text("import sys\nfor line in sys.argv[1:]:\n    sys.stdout.write(line + '\\r')\n"
                      "sys.stdout.write('\\n')\n")
    stage = console.StageOutput("train")
    records = []
    logger = logging.getLogger("test-stream")
    logger.addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    logger.setLevel(logging.INFO)
    rc, _ = pl.stream([sys.executable, str(script), *TRAIN_OUTPUT], tmp_path, 60, logger, output=stage)
    assert rc == 0
    shown = out.getvalue().splitlines()
    assert [line.split()[1] for line in shown] == ["20%", "40%", "60%", "80%"], shown  # the short Map bar: never
    assert shown[0].startswith("  train") and "39/196" in shown[0] and "elapsed" in shown[0]
    assert stage.summary == "adapter written to artifacts/train/adapter; eval CE 2.84"
    # the log: bars' final states only, the warning once (also when it followed a bar on one line), no escapes
    assert sum("%|" in r for r in records) == 2 and any("196/196" in r for r in records)
    assert sum("UserWarning" in r for r in records) == 1
    assert "{'eval_loss': '2.941', 'epoch': '1'}" in records and not any("\x1b" in r for r in records)
    assert "(2 repeated warning lines not shown again)" in records


def test_console_on_a_terminal_rewrites_one_progress_line(monkeypatch):
    import io
    import re

    from flows import console

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    term = console.Console(out)
    monkeypatch.setattr(console, "_console", term)
    stage = console.StageOutput("evaluate")
    for n in range(0, 61, 6):
        term.last_update = 0.0  # no throttling in the test
        stage.feed(f"golden answers: {n * 100 // 60}%|██  | {n}/60 [00:{10 + n:02d}<00:30,  2.0it/s]")
    term.line("  evaluate      70 s  golden: fact recall 0.2")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("  evaluate      70 s  golden: fact recall 0.2\n")
    assert text.count("\r") >= 10 and "golden answers 100%  60/60" in re.sub(r"\x1b\[K", "", text)


@pytest.mark.slow
@pytest.mark.parametrize("profile, model", [("tiny", "models/tiny-llama"), ("smol", "models/smollm2-135m-instruct")])
def test_demo_builds_the_profiles_offline_model_once_and_tracks_it(prefect_server, tmp_path, profile, model):
    from flows import demo
    from flows.workspace import prepare

    ws = prepare(tmp_path / "ws", profile)
    assert demo.build_base_model(str(ws)) == model
    assert (ws / model / "config.json").exists() and (ws / model / "tokenizer.json").exists()
    assert (ws / f"{model}.dvc").exists()  # tracked: queued experiments check it out, stages depend on it
    status = run(dvc("status", f"{model}.dvc"), ws)
    assert "changed" not in status.stdout, status.stdout
    stamp = (ws / model / "config.json").stat().st_mtime_ns
    assert demo.build_base_model(str(ws)) == model  # built: nothing is done again
    assert (ws / model / "config.json").stat().st_mtime_ns == stamp


def test_a_failed_stages_outputs_are_never_committed_by_the_workspace(tmp_path):
    """A validate gate failure leaves artifacts/validate/quarantine.jsonl for the user to read, before DVC lists it in
    its .gitignore; refreshing the workspace committed it, and every later run then failed."""
    from flows.workspace import commit, prepare

    ws = prepare(tmp_path / "ws", "tiny")
    (ws / "artifacts" / "validate").mkdir(parents=True)
    (ws / "artifacts" / "validate" / "quarantine.jsonl").write_text('{"reason": "ungrounded"}\n')
    (ws / "cache" / "generate").mkdir(parents=True)
    (ws / "cache" / "generate" / "responses.sqlite").write_bytes(b"x")
    prepare(ws, "tiny")
    commit(ws, "after a failed run")
    tracked = run(["git", "ls-files"], ws).stdout.split()
    assert not [f for f in tracked if f.startswith(("artifacts/", "cache/"))], tracked


def test_progress_lines_off_a_terminal_are_spaced_per_stage(monkeypatch):
    import io

    from flows import console

    out = io.StringIO()
    monkeypatch.setattr(console, "_console", console.Console(out))
    now = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    stage = console.StageOutput("evaluate")
    for bar in range(6):  # six one-minute bars, as evaluate runs one per question set and model
        for n in range(5):
            now[0] += 15
            stage.feed(f"golden/m{bar}: {n * 25}%|██  | {n}/4 [00:{10 + n * 15:02d}<00:30,  0.1it/s]")
    shown = out.getvalue().splitlines()
    # 6 bars x 3 steps would be 18 lines; in 7.5 minutes one every 2 minutes at most
    assert len(shown) == 3 and shown[0].startswith("  evaluate   golden/m0  25%  1/4"), shown


def test_cpu_threads_follow_idle_cores_or_the_override(monkeypatch):
    """Torch threads per stage process: the idle cores now (2 threads beside other work ran 3-8x slower than 1 on a
    2-core machine), or QRB_CPU_THREADS; a user's OMP_NUM_THREADS is left alone."""
    import os

    from qrb import stage
    from qrb.errors import ConfigError

    monkeypatch.delenv(stage.THREADS_ENV, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, threads in ((0.1, 2), (0.6, 1), (1.2, 1), (7.5, 1)):
        monkeypatch.setattr(stage, "busy_cores", lambda cores, busy=busy: busy)
        assert stage.cpu_threads() == threads, busy
    monkeypatch.undo()
    monkeypatch.delenv(stage.THREADS_ENV, raising=False)
    assert 0.0 <= stage.busy_cores(2) <= 2.0  # the real sample of this machine
    monkeypatch.setenv(stage.THREADS_ENV, "3")
    assert stage.cpu_threads() == 3
    monkeypatch.setenv(stage.THREADS_ENV, "many")
    with pytest.raises(ConfigError, match="QRB_CPU_THREADS"):
        stage.cpu_threads()
    monkeypatch.delenv(stage.THREADS_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert stage.set_cpu_threads(2) == 1 and os.environ["OMP_NUM_THREADS"] == "1"


def test_a_full_disk_fails_the_run_in_one_line_that_says_what_to_do(tmp_path):
    """CI's disk filled during the smol demo's export: DVC's "No space left on device" was the run's last word."""
    write = [sys.executable, "-c", "open('/dev/full', 'w').write('x' * 65536)"]  # /dev/full: every write is ENOSPC
    rc, tail = pl.stream(write, tmp_path, 60, logging.getLogger("test"))
    message = pl.headline(pl.stage_failure("stage export", rc, None, tail))
    assert message.startswith("stage export failed (dvc, exit 1, not retried): DVC failed, its command did not run: "
                              "OSError"), message
    assert "No space left on device" in message and message.endswith("the stages that finished are kept)")
    full = OSError(28, "No space left on device", "artifacts/export/merged/model.safetensors")  # a write in this process
    assert pl.headline(full).endswith("run it again (the stages that finished are kept)")
    assert pl.headline(RuntimeError("`git add -A` failed")) == "`git add -A` failed"  # other failures: as they were


def test_a_log_file_on_a_full_disk_does_not_break_the_run(prefect_server, capfd):
    """Each failed write of the log was reported on stderr, which Prefect's log_prints logs again: the demo on a full
    disk recursed until Python gave up and said only "maximum recursion depth exceeded"."""
    from prefect import flow

    from flows import console

    @flow(log_prints=True)
    def chatty() -> int:
        for i in range(5):
            print(f"line {i}")
            console.line(f"said {i}")
        return 42

    with console.quiet("/dev/full"):
        assert chatty() == 42
    err = capfd.readouterr().err
    assert "said 4" in err  # the console still shows what it says
    assert "Logging error" not in err and "RecursionError" not in err, err[-2000:]


def test_a_first_demo_on_a_disk_without_room_for_it_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from flows import demo

    ws = tmp_path / "ws"
    free = {"GB": 1.0}
    monkeypatch.setattr(demo.shutil, "disk_usage", lambda p: type("U", (), {"free": free["GB"] * 1e9})())
    with pytest.raises(SystemExit) as e:
        demo.main(["--workspace", str(ws), "--profile", "smol"])
    assert str(e.value).startswith(f"qrb demo: {tmp_path} has 1.0 GB free, and a first run on "
                                   "models/smollm2-135m-instruct writes about 4 GB there"), e.value
    assert not ws.exists()
    demo.check_disk(ws, "models/tiny-llama")  # the tiny profile fits
    demo.check_disk(ws, "meta-llama/Llama-3.1-8B-Instruct")  # a hub model: its size is not known here
    ws.mkdir()
    (ws / "dvc.lock").write_text("")
    demo.check_disk(ws, "models/smollm2-135m-instruct")  # a later run rewrites what the first one wrote
    free["GB"] = 5.0
    demo.check_disk(tmp_path / "other", "models/smollm2-135m-instruct")
