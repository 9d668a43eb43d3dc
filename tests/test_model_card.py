"""The model-card stage: every number in the card equals the metrics files; nothing is left for a person to fill."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

EVALUATE = {
    "golden": {
        "fine_tuned": {"n": 12, "rouge1": 0.412345, "rouge2": 0.201, "rougeL": 0.33, "bleu": 12.3456,
                       "bertscore_f1": 0.876543, "bertscore_f1_ci95": [0.85, 0.9], "rouge1_ci95": [0.39, 0.43],
                       "cross_entropy": 2.345678, "answer_words": 21.5},
        "base": {"n": 12, "rouge1": 0.2, "rouge2": 0.1, "rougeL": 0.15, "bleu": 3.21, "bertscore_f1": 0.801234,
                 "bertscore_f1_ci95": [0.79, 0.81], "cross_entropy": 3.456789, "answer_words": 40.0},
        "gpt-4o-mini": {"n": 12, "rouge1": 0.3, "rougeL": 0.25, "bleu": 8.0, "bertscore_f1": 0.84},
    },
    "eval": {
        "fine_tuned": {"n": 45, "rouge1": 0.5, "rouge2": 0.3, "rougeL": 0.45, "bleu": 20.5, "bertscore_f1": 0.9,
                       "cross_entropy": 1.9},
        "base": {"n": 45, "rouge1": 0.25, "rouge2": 0.1, "rougeL": 0.2, "bleu": 4.0, "bertscore_f1": 0.8,
                 "cross_entropy": 3.1},
    },
}
PAPERS = [
    {"doi": "10.22331/q-2024-07-03-1395", "title": "On the practical usefulness of the Hardware Efficient Ansatz",
     "authors": ["Lorenzo Leone", "M. Cerezo"], "published": "2024-07-03", "citation": "Quantum 8, 1395 (2024).",
     "license": "CC-BY-4.0"},
    {"doi": "10.22331/q-2024-08-01-1400", "title": "A second paper", "authors": ["Ada Lovelace"],
     "published": "2024-08-01", "citation": "Quantum 8, 1400 (2024).", "license": "CC-BY-4.0"},
    {"doi": "10.22331/q-2024-09-09-1500", "title": "A paper no pair came from", "authors": ["Nobody"],
     "published": "2024-09-09", "citation": "Quantum 8, 1500 (2024).", "license": "CC-BY-4.0"},
]


def write_pipeline_outputs(ws: Path) -> None:
    """A workspace as the pipeline leaves it after evaluate (values chosen to be recognisable)."""
    from flows.workspace import profile_params

    def put(rel: str, obj) -> None:
        path = ws / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj))

    params = profile_params("tiny", REPO)
    put("params.yaml", yaml.safe_dump(params))
    put("metrics/scrape.json", {"date_from": "2024-07-01", "date_to": "2024-12-31", "papers_kept": 337,
                                "requests": 401, "errors": 2, "full_text_fetched": 0})
    put("metrics/generate.json", {"pairs_raw": 5123, "pairs": 4987, "duplicates_exact": 11, "duplicates_near": 125,
                                  "papers": 337, "papers_with_pairs": 335, "total_tokens": 1234567,
                                  "cost_usd": 18.42, "train_papers": 300, "eval_papers": 35})
    put("metrics/validate.json", {"rows_out": {"train": 4711, "eval": 198, "total": 4909}, "rows_quarantined": 78,
                                  "fail_rate": 0.015641, "gate_passed": True})
    put("metrics/train.json", {"trainable_params": 546_308_096, "total_params": 8_576_569_344, "steps": 2356,
                               "train_loss": 1.234567, "eval_ce": 1.456789, "tokens_seen": 9_876_543})
    put("metrics/evaluate.json", EVALUATE)
    lineage = {"git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
               "inputs": {"artifacts/validate/dataset": "feedfacefeedfacefeedfacefeedface.dir"},
               "base_model": "meta-llama/Llama-3.1-8B-Instruct", "seed": 42, "wall_s": 5400.0,
               "tokens_seen": 9_876_543, "created_utc": "2026-11-01T10:00:00Z",
               "versions": {"torch": "2.13.0", "peft": "0.21.2"},
               "hardware": {"device": "cuda", "gpu": "NVIDIA A100-SXM4-80GB", "gpu_count": 1},
               "params": {"train": {"method": "lora_plus", "lora": {"r": 8, "alpha": 16, "dropout": 0.1,
                                                                    "target_modules": ["q_proj", "v_proj"],
                                                                    "modules_to_save": ["embed_tokens"],
                                                                    "init": "kaiming"},
                                    "loraplus_lr_ratio": 8.0, "learning_rate": 1e-4, "lr_scheduler": "cosine",
                                    "warmup_ratio": 0.0, "weight_decay": 0.01, "max_grad_norm": 0.3,
                                    "neftune_noise_alpha": 5.0, "batch_size": 8, "grad_accum": 1, "epochs": 4,
                                    "precision": "bf16", "max_length": 1024}}}
    put("artifacts/train/adapter/lineage.json", lineage)
    put("plots/train/train_loss.csv", "step,loss\n10,3.5\n20,2.9\n30,2.1\n")
    put("plots/train/eval_loss.csv", "step,loss\n20,3.0\n30,2.4\n")
    put("artifacts/scrape/papers.jsonl", "".join(json.dumps(p) + "\n" for p in PAPERS))
    pairs = [{"doi": PAPERS[0]["doi"], "model": "gpt-4-turbo", "prompt_id": "factual", "question": "q", "answer": "a"},
             {"doi": PAPERS[0]["doi"], "model": "gpt-4-turbo", "prompt_id": "methods", "question": "q", "answer": "a"},
             {"doi": PAPERS[1]["doi"], "model": "gpt-4-turbo", "prompt_id": "factual", "question": "q", "answer": "a"}]
    put("artifacts/validate/train.jsonl", "".join(json.dumps(p) + "\n" for p in pairs[:2]))
    put("artifacts/validate/eval.jsonl", json.dumps(pairs[2]) + "\n")
    put("dvc.lock", yaml.safe_dump({"schema": "2.0", "stages": {"scrape": {"outs": [
        {"path": "artifacts/scrape/papers.jsonl", "md5": "6e59aff4f9841a1c1c1a7c5eb0314de9"},
        {"path": "metrics/scrape.json", "md5": "36e55613ec1cf20c6b314b4ea3bdb150"}]}}}))


@pytest.fixture(scope="module")
def card_ws(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("card-ws")
    write_pipeline_outputs(ws)
    proc = subprocess.run([sys.executable, "-m", "stages.model_card"], cwd=ws, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


def card_text(ws: Path) -> str:
    return (ws / "artifacts" / "model_card" / "README.md").read_text()


def test_card_is_a_hub_model_card_with_the_eval_results_in_its_metadata(card_ws):
    from huggingface_hub import ModelCard

    card = ModelCard.load(card_ws / "artifacts" / "model_card" / "README.md")
    assert card.data.license == "cc-by-4.0"  # profiles/tiny.yaml's model_card.license
    assert card.data.base_model == "meta-llama/Llama-3.1-8B-Instruct" and card.data.library_name == "peft"
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    for set_name, by_model in EVALUATE.items():
        for key in ("bertscore_f1", "rouge1", "rougeL", "bleu", "cross_entropy"):
            assert results[(f"qrb-{set_name}", key)] == by_model["fine_tuned"][key]  # exact, not re-typed


def test_card_numbers_equal_the_metrics_files(card_ws):
    text = card_text(card_ws)
    golden = text.split("**golden questions** (n=12)")[1].split("**eval questions** (n=45)")[0]
    rows = {line.split("|")[1].strip(): line for line in golden.splitlines() if line.startswith("| ")}
    g = EVALUATE["golden"]
    tuned = rows["fine-tuned (this adapter)"]
    for key, fmt in (("bertscore_f1", ".4f"), ("rouge1", ".4f"), ("rouge2", ".4f"), ("bleu", ".2f"),
                     ("cross_entropy", ".4f"), ("answer_words", ".1f")):
        assert format(g["fine_tuned"][key], fmt) in tuned, key
    assert "0.8765 [0.8500, 0.9000]" in tuned  # the bootstrap interval from the file
    assert "| base (meta-llama/Llama-3.1-8B-Instruct) | 0.8012 [0.7900, 0.8100]" in text
    assert "| gpt-4o-mini | 0.8400 |" in text  # a rival is listed as evaluate named it
    for expected in ("| papers scraped | 337 (401 requests, 2 errors) |", "| publication window | 2024-07-01 to 2024-12-31 |",
                     "| pairs generated | 5123 (136 duplicates removed, 4987 kept) |",
                     "| train / eval pairs | 4711 / 198 (split by paper: 300 / 35 papers) |",
                     "1,234,567 tokens, USD 18.42", "546,308,096 trainable of 8,576,569,344",
                     "2356 optimizer steps, final train loss 1.2346", "eval cross-entropy 1.4568",
                     "1 x NVIDIA A100-SXM4-80GB", "1.500 hours (5400.0 s wall)", "| loraplus_lr_ratio | 8.0 |",
                     "| lora.r | 8 |", "| neftune_noise_alpha | 5.0 |", "`gpt-4-turbo`", "`factual` 2, `methods` 1",
                     "| `artifacts/scrape/papers.jsonl` | `6e59aff4f9841a1c1c1a7c5eb0314de9` |",
                     "feedfacefeedfacefeedfacefeedface.dir", "0123456789abcdef0123456789abcdef01234567"):
        assert expected in text, expected
    assert "metrics/scrape.json" not in text.split("## Lineage")[1]  # data hashes, not metric files


def test_card_has_nothing_for_a_person_to_fill(card_ws):
    text = card_text(card_ws)
    for placeholder in ("More Information Needed", "TODO", "TBD", "{{", "}}", "<fill", "None", "nan", "XXX"):
        assert placeholder not in text, placeholder
    for section in ("## Model details", "## Intended use and limits", "## Training data", "## Training procedure",
                    "### Loss curve", "## Evaluation", "## Compute", "## Lineage", "## License and attribution"):
        assert section in text
    # energy was not measured in this run: said so, not made up
    assert re.search(r"Energy and emissions:\*\* not measured", text)


def test_attribution_lists_the_papers_the_pairs_came_from(card_ws):
    text = card_text(card_ws).split("## License and attribution")[1]
    assert "CC-BY 4.0" in text and "https://creativecommons.org/licenses/by/4.0/" in text
    assert "Lorenzo Leone, M. Cerezo. *On the practical usefulness of the Hardware Efficient Ansatz*" in text
    assert "https://doi.org/10.22331/q-2024-08-01-1400" in text
    assert "A paper no pair came from" not in text and "2 papers" in text


def test_loss_curve_is_a_png_linked_from_the_card(card_ws):
    png = card_ws / "artifacts" / "model_card" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    text = card_text(card_ws)
    assert "![Train and eval loss](loss.png)" in text and "| 30 | 2.4000 |" in text


def test_loss_table_without_matplotlib(card_ws):
    from stages import model_card as mc

    cwd = os.getcwd()
    os.chdir(card_ws)
    try:
        inputs = mc.read_inputs()
        base, p = __import__("qrb.params", fromlist=["load_params"]).load_params(mc.SECTION, mc.PARAMS_CLASS,
                                                                                 mc.BASE_KEYS)
    finally:
        os.chdir(cwd)
    text = mc.render(inputs, p, base, has_png=False)
    assert "loss.png" not in text and "| 20 | 2.9000 | 3.0000 |" in text and "| 10 | 3.5000 | n/a |" in text


def test_missing_metrics_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.model_card"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "run the pipeline up to evaluate first" in proc.stderr.strip().splitlines()[-1]


def test_measured_energy_is_reported_from_lineage(tmp_path):
    """When train metered the run (codecarbon, lineage.json `emissions`), the card shows those numbers."""
    import json

    ws = tmp_path / "ws"
    ws.mkdir()
    write_pipeline_outputs(ws)
    lineage_path = ws / "artifacts/train/adapter/lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["emissions"] = {"energy_kwh": 0.0123, "co2_kg": 0.0045, "country": "DEU"}
    lineage_path.write_text(json.dumps(lineage))
    proc = subprocess.run([sys.executable, "-m", "stages.model_card"], cwd=ws, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = card_text(ws)
    assert "0.0123 kWh, 0.0045 kg CO2-eq (measured by codecarbon, DEU)" in text
    assert "not measured" not in text.split("Energy and emissions:")[1].splitlines()[0]
