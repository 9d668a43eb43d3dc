"""Lineage and DVC: the base model is a dependency of every stage that loads it (a local folder through
models/, a Hub id by its snapshot commit in lineage.json); `dvc plots show` draws offline, one chart per question set
and no meaningless stage-level plots; `dvc metrics` holds each stage's headline numbers, the rest is a plain report."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import REPO, headless_chromium

LOADS_BASE = ("train", "evaluate", "export", "model_card")
MODELS = ("base", "fine_tuned", "rag", "fine_tuned_rag")
EVERY_METRIC = ("correct", "incorrect", "not_attempted", "hallucination_rate", "fact_recall", "cross_entropy",
                "bertscore_f1", "bertscore_p", "bertscore_r", "rouge1", "rouge2", "rougeL", "bleu", "sentence_bleu",
                "answer_words", "correct_gain")


def dvc(ws: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    from flows.workspace import venv_env

    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=venv_env(), capture_output=True,
                          text=True, timeout=300)
    assert not check or proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def put(ws: Path, rel: str, text: str) -> None:
    path = ws / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def evaluate_report(sets=("golden", "golden_after_cutoff", "seen", "seen_before_cutoff", "eval")) -> dict:
    """A full evaluate record as the stage builds it: every metric with its interval and n, per set and model."""
    out = {}
    for i, s in enumerate(sets):
        out[s] = {}
        for j, m in enumerate(MODELS):
            rec = {"n": 12, "fact_n": 10, "graded_n": 10}
            for k, key in enumerate(EVERY_METRIC):
                v = round(0.05 + 0.9 * ((i + 2 * j + 3 * k) % 10) / 10, 6)
                rec[key], rec[f"{key}_ci95"] = v, [round(v * 0.8, 6), round(min(1.0, v * 1.2), 6)]
            out[s][m] = rec
    return out


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory) -> Path:
    """A workspace of the tiny profile whose base model, models/tiny-llama, is a (stand-in) folder tracked by DVC."""
    from flows.workspace import commit, prepare

    ws = prepare(tmp_path_factory.mktemp("lineage") / "ws", "tiny")
    put(ws, "models/tiny-llama/config.json", json.dumps({"model_type": "llama", "hidden_size": 64}))
    dvc(ws, "add", "-q", "models/tiny-llama")
    commit(ws, "base model")
    return ws


def test_a_changed_local_base_model_makes_train_stale(tiny_ws):
    ws = tiny_ws
    # train's deps and outs as a finished run leaves them, recorded in dvc.lock
    put(ws, "artifacts/validate/dataset/dataset_dict.json", '{"splits": ["train", "eval"]}')
    put(ws, "artifacts/scrape/papers.jsonl", "")  # the papers' text (train.text)
    put(ws, "artifacts/train/adapter/adapter_config.json", "{}")
    put(ws, "cache/train/.keep", "")
    for rel in ("metrics/train.json", "reports/train.json"):
        put(ws, rel, '{"eval_ce": 2.0}')
    for rel in ("dvclive/plots/metrics/loss.tsv", "dvclive/plots/metrics/eval/loss.tsv"):
        put(ws, rel, "step\tloss\n1\t2.5\n2\t2.0\n")
    put(ws, "dvclive/metrics.json", '{"loss": 2.0}')
    put(ws, "dvclive/params.yaml", "seed: 7\n")
    dvc(ws, "commit", "-q", "-f", "train")
    assert "up to date" in dvc(ws, "status", "train").stdout

    put(ws, "models/tiny-llama/config.json", json.dumps({"model_type": "llama", "hidden_size": 128}))
    status = dvc(ws, "status", "train").stdout
    assert "changed deps" in status and "modified:" in status and "models" in status, status
    dry = dvc(ws, "repro", "--dry", "--single-item", "train").stdout
    assert "Running stage 'train'" in dry, dry


def test_dvc_dag_joins_the_base_model_to_every_stage_that_loads_it(tiny_ws):
    dot = dvc(tiny_ws, "dag", "--dot").stdout
    for stage in LOADS_BASE:
        assert f'"models/tiny-llama.dvc" -> "{stage}"' in dot, dot


def test_the_flagship_hub_id_keeps_the_same_dvc_yaml_valid(tmp_path):
    """The flagship's base is a Hub id, no file: models/ is still there (its README), so the dep never goes missing."""
    from flows.workspace import prepare

    ws = prepare(tmp_path / "hub", None)
    assert "/" in yaml.safe_load((ws / "params.yaml").read_text())["base"]["model"]  # meta-llama/...
    assert not (ws / "models" / "meta-llama").exists()
    status = json.loads(dvc(ws, "status", "--json").stdout)  # never run: every stage, each dep unlocked
    for stage in LOADS_BASE:
        deps = next(e["changed deps"] for e in status[stage] if "changed deps" in e)
        assert deps["models"] == "modified", deps  # there (not "deleted"), only never locked
    assert dvc(ws, "dag", "--dot").returncode == 0
    # the repo itself: the placeholder is committed (not git-ignored), local models' .dvc files too, weights not
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "models/README.md", "models/x.dvc",
                              "models/x/model.safetensors"], cwd=REPO, capture_output=True, text=True).stdout
    assert ignored.split() == ["models/x/model.safetensors"]


def test_lineage_records_the_exact_base_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from stages.model_card.render import base_revision
    from stages.train.lineage import model_revision

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hf" / "models--org--base"
    put(repo_cache, f"snapshots/{commit}/config.json", "{}")
    put(repo_cache, "refs/main", commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    hub = model_revision("org/base")
    assert hub["revision"] == commit and hub["from"] == "local Hugging Face cache"
    assert commit in base_revision({"base_model_revision": hub})
    assert model_revision("org/not-cached", offline=True) == {"source": "hub", "revision": None}

    monkeypatch.chdir(tmp_path)
    put(tmp_path, "models/tiny/config.json", "{}")
    assert model_revision("models/tiny")["dvc_md5"] is None  # not tracked: said so, not invented
    put(tmp_path, "models/tiny.dvc", "outs:\n- md5: 5d41402abc4b2a76b9719d911017c592.dir\n  path: tiny\n")
    local = model_revision("models/tiny")
    assert local["dvc_md5"] == "5d41402abc4b2a76b9719d911017c592.dir"
    assert "5d41402abc4b2a76b9719d911017c592.dir" in base_revision({"base_model_revision": local})


def test_headline_metrics_are_a_few_numbers_and_the_whole_record_a_plain_out():
    from qrb.io import headline
    from stages.evaluate.report import HEADLINE_METRICS, headline_keys

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in spec.items():
        assert "plots" not in stage, name  # stage-level plots drew meaningless auto charts
        metrics = [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
        if metrics:
            live = ["dvclive/metrics.json"] if name == "train" else []  # DVCLive's last logged values, DVC's layout
            assert metrics == [f"metrics/{name}.json", *live] and f"reports/{name}.json" in outs, name

    full = evaluate_report()
    head = headline(full, headline_keys(full))
    assert set(head) == {"golden", "seen", "eval"}  # the freshness subsets stay in the report
    for by_model in head.values():
        assert set(by_model) == set(MODELS)
        assert all(set(m) == set(HEADLINE_METRICS) for m in by_model.values())
    # the grades, and the CE the smol e2e test compares
    assert set(HEADLINE_METRICS) == {"correct", "not_attempted", "hallucination_rate", "cross_entropy"}
    assert numeric_leaves(head) == 3 * 4 * len(HEADLINE_METRICS) <= 72

    import stages.export as export
    import stages.generate.run as generate
    import stages.scrape.run as scrape
    import stages.train.run as train
    import stages.validate.run as validate

    train_record = {"checkpoint_key": "cd56ffa362567b59", "data_sha256": "35bc" * 16, "method": "lora_plus",
                    "emissions": {"co2_kg": 0.0005, "country": "USA"}, "eval_ce": 4.18, "train_loss": 1.29,
                    "tokens_per_s": 71.9, "trainable_params": 30754368, "resumed_from_step": None, "world_size": 1}
    assert headline(train_record, train.HEADLINE) == {"eval_ce": 4.18, "train_loss": 1.29, "tokens_per_s": 71.9,
                                                      "trainable_params": 30754368}
    for module in (scrape, generate, validate, train, export):
        assert len(module.HEADLINE) <= 12, module.__name__  # a dozen numbers at most


def numeric_leaves(node) -> int:
    if isinstance(node, dict):
        return sum(numeric_leaves(v) for v in node.values())
    assert isinstance(node, (int, float)) and not isinstance(node, bool), f"not a number: {node!r}"
    return 1


CHARTS_JS = """return [...document.querySelectorAll('body > div[id]')].map(div => ({id: div.id,
    svg: div.querySelectorAll('svg').length, bars: div.querySelectorAll('.mark-rect path').length,
    lines: div.querySelectorAll('.mark-line path').length,
    title: (div.querySelector('.role-title-text') || {}).textContent || ''}))"""


def test_dvc_plots_show_draws_every_chart_offline_in_headless_chromium(tiny_ws):
    from flows.artifacts import render_plots
    from stages.evaluate.report import write_scores

    ws = tiny_ws
    put(ws, "dvclive/plots/metrics/loss.tsv", "step\tloss\n" + "".join(f"{s}\t{3 - s / 10:.3f}\n" for s in range(1, 9)))
    put(ws, "dvclive/plots/metrics/eval/loss.tsv", "step\tloss\n4\t2.9\n8\t2.7\n")
    full = evaluate_report()
    (ws / "plots/evaluate/scores").mkdir(parents=True, exist_ok=True)
    put(ws, "plots/evaluate/scores/stale_set.csv", "label,model,metric,score,lo,hi\n")
    import os

    cwd = os.getcwd()
    os.chdir(ws)
    try:
        write_scores(full)
    finally:
        os.chdir(cwd)
    csvs = sorted(p.name for p in (ws / "plots/evaluate/scores").glob("*.csv"))
    assert csvs == ["eval.csv", "golden.csv", "seen.csv"]  # one per question set, no freshness subsets, no stale file
    bars = {f"plots/evaluate/scores/{name}": len((ws / "plots/evaluate/scores" / name).read_text().splitlines()) - 1
            for name in csvs}
    assert set(bars.values()) == {16}  # 4 models x 4 headline scores: a readable chart

    plots = json.loads(dvc(ws, "plots", "show", "--json").stdout)["data"]
    assert set(plots) == {"loss", *bars}  # no auto-generated stage-level plot
    dvc(ws, "plots", "show")
    page = ws / "dvc_plots" / "index.html"
    html = page.read_text()
    assert "cdn.jsdelivr.net" not in html and "<script src" not in html
    assert subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=ws).returncode == 0
    assert subprocess.run(["git", "check-ignore", "-q", "--no-index", "dvc_plots/index.html"], cwd=REPO).returncode == 0
    published = render_plots(ws)  # the page the flows link to (qrb-plots), from the same template
    assert published is not None and "cdn.jsdelivr.net" not in published.read_text()

    with headless_chromium(offline=True) as driver:
        for target in (page, published):
            driver.get(target.resolve().as_uri())
            deadline = time.time() + 60
            while True:
                charts = driver.execute_script(CHARTS_JS)
                if (len(charts) == 1 + len(bars) and all(c["svg"] for c in charts)) or time.time() > deadline:
                    break
                time.sleep(0.5)
            by_title = {c["title"]: c for c in charts}
            assert len(charts) == 1 + len(bars), charts
            for path, n in bars.items():
                assert by_title[path]["bars"] == n, charts
            loss = next(c for c in charts if c["id"] == "loss")
            assert loss["lines"] >= 2 and loss["title"].startswith("Train and eval loss"), charts
            assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
            log = driver.get_log("browser")
            assert not [e for e in log if e["level"] == "SEVERE" or "Failed to load" in e["message"]], log
