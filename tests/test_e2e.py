"""End to end: the main job (the demo flow) on the tiny profile, then DVC's promises in its workspace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.workspace import profile_params
from helpers import set_args
from standins.services import free_ports, port_overrides

pytestmark = pytest.mark.slow


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    from flows.workspace import venv_env

    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, prefect_server):
    """`qrb demo --profile tiny` as a user runs it (a subprocess, its console captured), on free ports, reporting to
    the tests' Prefect server."""
    from prefect.settings import PREFECT_API_URL

    from flows.workspace import venv_env

    ws = tmp_path_factory.mktemp("e2e") / "demo"
    overrides = port_overrides(profile_params("tiny"), *free_ports(2))
    env = venv_env({"PREFECT_API_URL": PREFECT_API_URL.value(), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "demo", "--workspace", str(ws), "--profile", "tiny",
                           *set_args(overrides)], env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    run = json.loads((ws / "logs" / "demo.json").read_text())
    return ws, run, overrides, proc


def test_demo_console_is_a_line_per_step_and_the_summary_once(demo_run):
    ws, run, _, proc = demo_run
    console = proc.stderr.splitlines()
    print(proc.stderr, proc.stdout, sep="\n")  # shown with pytest -s
    log = ws / "logs" / "demo.log"
    assert len(console) <= 40, proc.stderr
    assert str(log) in console[0] and str(log) in proc.stdout, (console[0], proc.stdout[-500:])
    for stage in [r["stage"] for r in run["stages"]]:
        [line] = [c for c in console if c.split()[:1] == [stage] and " s " in c]  # one line each, with seconds
        assert "FAILED" not in line
    assert [c.split()[0] for c in console if c.startswith("  ")][:3] == ["workspace", "base", "services"]
    assert "\r" not in proc.stderr and "Traceback" not in proc.stderr and "telemetry" not in proc.stderr
    # long work shows progress (off a terminal: a line at a 20% step, at most every 2 minutes)
    assert any(c.split()[0] == "train" and "%" in c and "elapsed" in c for c in console), proc.stderr
    # the summary: one screen, printed once (the tables stay in reports/)
    screen = proc.stdout.splitlines()
    assert len(screen) <= 40 and max(map(len, screen)) <= 100 and "|" not in proc.stdout, proc.stdout
    assert proc.stdout.count("Stages: ") == 1 and "Example (" in proc.stdout and "fine-tuned" in proc.stdout
    # every detail is in the log it names: the stages' own output, DVC's, Prefect's
    details = log.read_text()
    assert "Running stage 'train'" in details and "adapter written to" in details and "Finished in state" in details


def test_demo_runs_all_five_stages_for_real(demo_run):
    ws, run, _, _ = demo_run
    assert [r["stage"] for r in run["stages"]] == ["scrape", "index", "generate", "validate", "train", "evaluate",
                                                   "model_card", "export"]
    assert all(r["ran"] for r in run["stages"])
    papers = [json.loads(line) for line in (ws / "artifacts/scrape/papers.jsonl").read_text().splitlines()]
    assert len(papers) >= 30 and all(p["doi"].startswith("10.22331/q-2024-") for p in papers)
    gen = json.loads((ws / "metrics/generate.json").read_text())
    assert gen["train_pairs"] > 100 and gen["eval_pairs"] > 10
    val = json.loads((ws / "reports/validate.json").read_text())
    assert val["gate_passed"] is True
    assert (ws / "reports/data_docs/index.html").exists()
    adapter = ws / "artifacts/train/adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "lineage.json").exists()
    assert (ws / "dvclive/plots/metrics/loss.tsv").read_text().count("\n") > 3


def test_fine_tuned_beats_base_on_held_out_pairs(demo_run):
    ws, _, _, _ = demo_run
    m = json.loads((ws / "reports/evaluate.json").read_text())
    head = json.loads((ws / "metrics/evaluate.json").read_text())
    assert head["eval"]["fine_tuned"]["cross_entropy"] < head["eval"]["base"]["cross_entropy"] - 0.05
    for set_name in ("golden", "eval"):
        for model in ("fine_tuned", "base"):
            for key in ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "cross_entropy"):
                assert isinstance(m[set_name][model][key], float)
    assert "| fine-tuned" in (ws / "reports/eval_table.md").read_text()


def numbers(node, path: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in numbers(child, f"{path}.{key}".strip(".")).items()}
    assert isinstance(node, (int, float)) and not isinstance(node, bool), f"{path}: {node!r} is no number"
    return {path: node}


def test_dvc_metrics_are_the_headline_numbers_and_exp_show_fits(demo_run):
    """`dvc exp show` had 422 columns on this demo (277 of them metrics: every interval, count, hash and name)."""
    ws, _, _, _ = demo_run
    leaves = {rel.name: numbers(json.loads(rel.read_text())) for rel in sorted((ws / "metrics").glob("*.json"))}
    assert set(leaves) == {f"{s}.json" for s in ("scrape", "generate", "validate", "train", "evaluate", "export")}
    assert all(len(v) <= 12 for name, v in leaves.items() if name != "evaluate.json"), leaves
    assert len(leaves["evaluate.json"]) <= 3 * 4 * 6  # sets x local models x headline metrics
    assert {"eval_ce", "train_loss", "tokens_per_s", "trainable_params"} == set(leaves["train.json"])
    for stage in ("scrape", "generate", "validate", "train", "evaluate", "export"):
        assert (ws / "reports" / f"{stage}.json").exists()  # the whole record, beside it
    proc = dvc(ws, "exp", "show", "--no-pager", "--csv")
    assert proc.returncode == 0, proc.stderr
    columns = proc.stdout.splitlines()[0].split(",")
    metric_columns = sum(len(v) for v in leaves.values())
    # the rest are params (every key of the sections the stages depend on, the index and retrieval ones included)
    assert metric_columns <= 100 and len(columns) <= 300, len(columns)


def test_repro_again_runs_nothing(demo_run):
    ws, _, _, _ = demo_run
    proc = dvc(ws, "repro")
    assert proc.returncode == 0, proc.stderr
    assert "Running stage" not in proc.stdout
    assert "up to date" in dvc(ws, "status").stdout


def test_demo_again_is_a_no_op_and_keeps_the_workspace(demo_run, prefect_server):
    from flows.demo import demo

    ws, _, overrides, _ = demo_run
    run = demo(str(ws), "tiny", overrides)
    assert not any(r["ran"] for r in run["stages"]), run["stages"]


def test_exp_run_reruns_only_train_and_downstream_and_metrics_diff_shows_it(demo_run):
    ws, _, _, _ = demo_run
    proc = dvc(ws, "exp", "run", "-S", "train.lora.r=4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ran = {line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate", "model_card", "export"}, proc.stdout[-3000:]  # all downstream of train
    diff = dvc(ws, "metrics", "diff", "--json")
    assert diff.returncode == 0, diff.stderr
    changes = json.loads(diff.stdout)
    train = changes["metrics/train.json"]
    assert train["trainable_params"]["new"] < train["trainable_params"]["old"]
    assert any(k.startswith("eval.fine_tuned.") for k in changes["metrics/evaluate.json"])
    assert not any(k.startswith("eval.base.") for k in changes["metrics/evaluate.json"])  # the base didn't move
