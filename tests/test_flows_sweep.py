"""The sweep flow: its config, the Optuna narrowing and the per-technique table (fast, no DVC), and a real tiny
sweep on CPU (slow: the tiny profile's scrape/generate/validate once, then three train experiments)."""

from __future__ import annotations

import textwrap

import pytest

from flows import sweep as sw
from standins.services import free_ports

CONFIG = """
target: train
fixed: {train.epochs: 0.5, base.max_length: 128}
grid:
  train.method: [lora, dora]
  train.lora.r: [4]
  train.learning_rate: [1.0e-3]
search:
  trials: 1
  seed: 0
  space:
    train.lora.r: {type: int, low: 2, high: 8, log: true}
    train.learning_rate: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
"""


def write(tmp_path, text):
    path = tmp_path / "sweep.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_repo_config_grid_is_methods_x_rank_x_lr():
    cfg = sw.load_config(sw.DEFAULT_CONFIG)
    points = sw.grid_points(cfg)
    assert len(points) == len(cfg.methods) * len(cfg.grid["train.lora.r"]) * len(cfg.grid["train.learning_rate"])
    assert {"lora", "lora_plus", "dora"} <= set(cfg.methods)
    assert cfg.trials > 0 and set(cfg.space) == {"train.lora.r", "train.learning_rate"}


@pytest.mark.parametrize("text, message", [
    ("grid: {train.lora.r: [4]}", "techniques"),
    ("grid: {train.method: [lora], train.lora.r: []}", "non-empty"),
    ("grid: {train.method: [lora]}\nmode: parallel", "sequential or queue"),
    ("grid: {train.method: [lora]}\nsearch: {trials: 2}", "search.space"),
    ("grid: {train.method: [lora]}\nsearch: {space: {train.method: {low: 1, high: 2}}}", "techniques come from"),
    ("grid: {train.method: [lora]}\ngird: {}", "unknown key `gird`"),
    ("grid: {train.method: [lora]}\nreport: [{name: x, file: metrics/evaluate.json}]", "name, file, key"),
    ("grid: {train.method: [lora]}\ncard: {lora: high}", "map a technique to a number"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        sw.load_config(write(tmp_path, text))


def test_methods_table_config_reads_extra_columns_and_shows_the_cards_numbers(tmp_path):
    """flows/sweep-methods.yaml: the card's four techniques, the graded answers read from each run's metrics beside
    eval CE."""
    import json

    cfg = sw.load_config(sw.REPO_ROOT / "flows" / "sweep-methods.yaml")
    assert cfg.methods == ["lora", "lora_plus", "dora", "loreft"] and cfg.target == "evaluate"
    assert cfg.card == {"lora": 0.4603, "lora_plus": 0.4011, "dora": 0.4182, "loreft": 0.4824}
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "evaluate.json").write_text(json.dumps(
        {"seen": {"fine_tuned": {"correct": 0.25, "cross_entropy": 1.5}, "base": {"cross_entropy": 3.0}}}))
    got = sw.read_report(tmp_path, cfg.report)
    assert got["correct (FT)"] == 0.25 and got["seen CE (base)"] == 3.0
    assert got["not attempted (FT)"] is None  # a key the run lacks is a gap, not a crash
    runs = [{"name": "e1", "params": {"train.method": "dora"}, "metric": 1.9, "report": got}]
    table = sw.table_markdown(sw.best_per_technique(runs, cfg.methods), cfg)
    [row] = [line for line in table.splitlines() if line.startswith("| dora")]
    assert row.split(" | ")[1:5] == ["1.9000", "0.4182", "1.500", "3.000"] and "| 0.250 |" in row and "| – |" in row
    assert "| lora | failed | 0.4603 |" in table  # no run: the card's number still shows


def test_optuna_studies_are_seeded_with_grid_results_and_stay_in_space(tmp_path):
    cfg = sw.load_config(write(tmp_path, CONFIG.replace("trials: 1", "trials: 4")))
    runs = [{"name": "a", "params": {"train.method": "lora", "train.lora.r": 4, "train.learning_rate": 1e-3},
             "metric": 2.5},
            {"name": "b", "params": {"train.method": "dora", "train.lora.r": 4, "train.learning_rate": 1e-3},
             "metric": 2.4},
            {"name": "c", "params": {"train.method": "dora", "train.lora.r": 64, "train.learning_rate": 1e-3},
             "metric": 2.0}]  # outside the space (r <= 8): not a seed
    studies = sw.make_studies(cfg, runs)
    assert [len(studies[m].trials) for m in ("lora", "dora")] == [1, 1]
    assert studies["dora"].best_value == 2.4
    trial, params = sw.suggest(studies["lora"], cfg)
    assert 2 <= params["train.lora.r"] <= 8 and 1e-4 <= params["train.learning_rate"] <= 3e-3
    assert params["train.learning_rate"] == float(f"{params['train.learning_rate']:.3g}")


def test_table_best_eval_ce_per_technique(tmp_path):
    cfg = sw.load_config(write(tmp_path, CONFIG))
    runs = [{"name": "g0", "params": {"train.method": "lora", "train.lora.r": 4, "train.learning_rate": 1e-3},
             "metric": 2.5},
            {"name": "t0", "params": {"train.method": "lora", "train.lora.r": 8, "train.learning_rate": 5e-4},
             "metric": 2.3},
            {"name": "g1", "params": {"train.method": "dora", "train.lora.r": 4, "train.learning_rate": 1e-3},
             "metric": None, "error": "boom"}]
    rows = sw.best_per_technique(runs, cfg.methods)
    assert [(r["technique"], r["best"] and r["best"]["name"]) for r in rows] == [("lora", "t0"), ("dora", None)]
    table = sw.table_markdown(rows, cfg)
    assert "| lora | 2.3000 | 8 | 0.0005 | t0 | 2 |" in table
    assert "| dora | failed |" in table and "1 failed" in table


def test_a_run_without_an_eval_set_has_no_eval_ce_and_is_never_best(tmp_path):
    """An empty eval split: train writes eval_ce null; the sweep reads it as no metric (not a failure, never 0, never
    the best) and the table says so."""
    import json

    cfg = sw.load_config(write(tmp_path, CONFIG))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "train.json").write_text(json.dumps({"eval_ce": None, "train_loss": 1.0}))
    assert sw.read_metric(tmp_path, cfg) is None
    runs = [{"name": "g0", "params": {"train.method": "lora"}, "metric": None},
            {"name": "g1", "params": {"train.method": "dora"}, "metric": 2.4}]
    assert sw.best_run(runs)["name"] == "g1" and sw.best_run(runs[:1]) is None
    table = sw.table_markdown(sw.best_per_technique(runs, cfg.methods), cfg)
    assert "| lora | no eval set |" in table and "failed" not in table, table


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path, tiny_model_dir):
    """Tiny profile, offline: 2 grid experiments (lora, dora) + 1 Optuna trial, each a DVC experiment."""
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows.workspace import dvc, run

    with prefect_test_harness(server_startup_timeout=60):
        state = sw.sweep(str(tmp_path / "ws"), str(write(tmp_path, CONFIG)), profile="tiny",
                         params={"base.model": str(tiny_model_dir)}, ports=free_ports(2), return_state=True)
        assert state.is_completed(), state.message
        with get_client(sync_client=True) as client:
            published = client.read_artifacts()
    result = state.result()
    runs = result["runs"]
    assert len(runs) == 3 and all(r["metric"] is not None and r["metric"] > 0 for r in runs)
    assert [r["params"]["train.method"] for r in runs] == ["lora", "dora", "lora"]
    table = result["table"]
    assert table == next(a.data for a in published if a.key == "qrb-sweep")
    assert "Best eval cross-entropy per technique" in table
    for method in ("lora", "dora"):
        best = min(r["metric"] for r in runs if r["params"]["train.method"] == method)
        assert f"| {method} | {best:.4f} |" in table
    shown = run(dvc("exp", "show", "--no-pager", "--md"), tmp_path / "ws").stdout
    assert all(r["name"] in shown for r in runs)  # every point is a DVC experiment
