"""The validate stage's parts, each on its own (stages/validate/: text, features, suite, report, run): small hand-made
inputs, no corpus. The whole stage (core and subprocess) is tested in tests/test_validate.py."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

from stages.validate import ValidateParams
from stages.validate import features as T
from stages.validate.core import Outcome, summary, write_index_html
from stages.validate.features import dataset_columns, row_features
from stages.validate.suite import DATASET_SUITE, CheckResult, GxRunner, dataset_checks, row_checks

REPO = Path(__file__).resolve().parent.parent

P = ValidateParams(min_question_chars=15, max_question_chars=400, min_answer_chars=10, max_answer_chars=2000,
                   min_rows=1, max_fail_rate=0.2, max_paper_share=0.6, min_grounding=0.5, min_similarity=0.0,
                   min_eval_rows=0, max_eval_fraction=0.5)

TITLE = "Option pricing under stochastic volatility on a quantum computer"
DOI = "10.22331/q-2024-10-23-1504"
PAPER = {"doi": DOI, "title": TITLE, "published": "2024-10-23",
         "abstract": "We develop quantum algorithms for pricing Asian and barrier options under the Heston model. "
                     "The weak Euler method needs fewer qubits than the exact simulation."}


_FACTS = itertools.count()


def pair(question: str, answer: str, doi: str = DOI, **extra) -> dict:
    """A pair as generate writes it; each is a fact of its own (variant 0) unless `fact_id`/`variant` say else."""
    return {"question": question, "answer": answer, "doi": doi, "title": TITLE, "published": "2024-10-23",
            "prompt_id": "factual", "model": "m", "response_id": f"r-{question}", "chunk": 0,
            "fact_id": f"fact-{next(_FACTS)}", "variant": 0, **extra}


# ---------------------------------------------------------------------------------------------------------------
# text

def test_normalisation_drops_case_punctuation_and_latex_markers():
    assert T.normalize_text("  What is $\\alpha$-Entanglement?? ") == "what is alpha entanglement"
    assert T.normalize_text("WHAT is  alpha entanglement?") == T.normalize_text("What is $\\alpha$-entanglement")


def test_content_tokens_stem_drop_stopwords_and_spell_out_greek():
    assert T.content_tokens("entangled states") == T.content_tokens("Entangling state")
    assert T.content_tokens("the error ε of this paper") == ["error", "epsilon"]


def test_overlap_is_the_share_of_answer_words_found_in_the_paper():
    paper = set(T.content_tokens(TITLE))
    assert T.overlap_score("stochastic volatility pricing", paper) == 1.0
    assert T.overlap_score("stock market pricing", paper) == pytest.approx(1 / 3)
    assert T.overlap_score("", paper) == 0.0


def test_is_question_and_is_english():
    assert T.is_question("What is QSP?")
    assert not T.is_question("Why?") and not T.is_question("Summarise the paper.") and not T.is_question("A? B? C? D?")
    assert T.is_english("The authors show that the bound is tight.") and T.is_english("$x^2 + y^2$")
    assert not T.is_english("Die Autoren zeigen, dass die Schranke nicht scharf ist und wir werden sehen.")
    assert not T.is_english("该论文提出了一种新的量子算法")


def test_a_question_may_say_this_paper_only_when_it_names_it():
    assert T.leans_on_unnamed_source("What does this paper conclude?", TITLE, DOI)
    assert not T.leans_on_unnamed_source(f'What does this paper, "{TITLE}", conclude?', TITLE, DOI)
    assert not T.leans_on_unnamed_source(f"What does this paper ({DOI}) conclude?", TITLE, DOI)


# ---------------------------------------------------------------------------------------------------------------
# features

def test_row_features_flag_repeats_unknown_papers_and_grounding():
    q = f'What does "{TITLE}" say about the weak Euler method?'
    rows = [("train", 1, pair(q, "The weak Euler method needs fewer qubits than the exact simulation.")),
            ("train", 2, pair(q, "It needs fewer qubits.")),
            ("train", 3, pair("  " + q.upper(), "Quantum algorithms price Asian and barrier options.")),
            ("eval", 1, pair("Which market crashed in December of last year?", "The stock market did.",
                             doi="10.22331/q-2099-01-01-1")),
            ("eval", 2, ["not", "an object"])]
    f = row_features(rows, {DOI: PAPER}, P)
    assert [r["row_id"] for r in f] == ["train:1", "train:2", "train:3", "eval:1", "eval:2"]
    assert [r["first_exact"] for r in f] == [True, False, True, True, True]
    assert [r["first_normalised"] for r in f] == [True, True, False, True, True]  # an exact repeat is not "near"
    assert f[0]["grounding"] == 1.0 and f[0]["paper_known"] and f[0]["names_its_subject"]
    assert not f[3]["paper_known"] and f[3]["grounding"] == 0.0
    assert not f[4]["has_required_fields"] and f[4]["question"] == "" and not f[4]["provenance_ok"]
    assert "similarity" not in f[0]                                            # min_similarity 0: no model


def test_dataset_columns_share_per_paper_and_split_overlap():
    feats = [{"row_id": "train:1", "split": "train", "doi": "a"}, {"row_id": "train:2", "split": "train", "doi": "a"},
             {"row_id": "train:3", "split": "train", "doi": "b"}, {"row_id": "eval:1", "split": "eval", "doi": "b"}]
    cols = dataset_columns(feats, [False, False, True, False])
    assert cols["failed"] == [0, 0, 1, 0] and cols["clean_train"] == [1, 1, 0, 0] and cols["clean_eval"] == [0, 0, 0, 1]
    assert cols["train_paper_share"][:2] == [1.0, 1.0] and math.isnan(cols["train_paper_share"][2])
    assert cols["paper_in_both_splits"] == [False, False, None, False]         # b's train row failed: b not shared
    assert cols["eval_share"][3] == 1.0 and math.isnan(cols["eval_share"][2])


# ---------------------------------------------------------------------------------------------------------------
# suite

def test_check_lists_have_unique_reasons_and_similarity_only_when_on():
    reasons = [c.reason for c in row_checks(P)]
    assert len(reasons) == len(set(reasons)) and "off_topic" not in reasons
    assert "off_topic" in {c.reason for c in row_checks(dataclasses.replace(P, min_similarity=0.3))}
    assert [c.kwargs["max_value"] for c in dataset_checks(P) if c.reason == "max_paper_share"] == [P.max_paper_share]


def test_gx_runner_maps_results_back_to_reasons_rows_and_papers():
    feats = [{"row_id": "train:1", "split": "train", "doi": "a"}, {"row_id": "train:2", "split": "train", "doi": "a"},
             {"row_id": "eval:1", "split": "eval", "doi": "a"}]
    results = GxRunner(P, None).run(DATASET_SUITE, dataset_columns(feats, [False, False, False]))
    assert [r.reason for r in results] == [c.reason for c in dataset_checks(P)]  # in check order
    by = {r.reason: r for r in results}
    assert not by["max_paper_share"].success and by["max_paper_share"].observed == 1.0
    assert not by["split_disjoint"].success and sorted(by["split_disjoint"].unexpected) == ["eval:1", "train:1",
                                                                                             "train:2"]
    assert set(by["split_disjoint"].unexpected_dois) == {"a"}
    assert by["max_fail_rate"].success and by["min_rows"].success


# ---------------------------------------------------------------------------------------------------------------
# report

def failing_outcome() -> Outcome:
    bad = pair("What does this paper conclude about options?", "As an AI, I cannot read it.")
    rows = [CheckResult("refusal_or_boilerplate", "[refusal_or_boilerplate] no refusal", False, ["train:2"],
                        limit={"value_set": [True]}),
            CheckResult("unnamed_reference", "[unnamed_reference] names the paper", False, ["train:2"],
                        limit={"value_set": [True]}),
            CheckResult("not_english", "[not_english] in English", True, [], limit={"value_set": [True]})]
    gate = [CheckResult("max_fail_rate", "[max_fail_rate] at most 20%", False, [], observed=0.5,
                        limit={"min_value": 0.0, "max_value": 0.2})]
    metrics = {"rows_in": {"train": 2, "eval": 0, "total": 2}, "rows_out": {"train": 1, "eval": 0, "total": 1},
               "rows_quarantined": 1, "fail_rate": 0.5}
    quarantine = [{"row_id": "train:2", "split": "train", "line": 2,
                   "reasons": ["refusal_or_boilerplate", "unnamed_reference"], "scores": {}, "row": bad}]
    return Outcome([pair("Q?", "A.")], [], quarantine, rows, gate, {"train": 2, "eval": 0}, False, metrics)


def test_summary_names_the_failed_gate_counts_and_an_example():
    text = summary(failing_outcome())
    assert text.startswith("validate: gate FAILED")
    assert "1 quarantined (50.0%)" in text
    assert "max_fail_rate: observed 0.5, allowed <= 0.2" in text
    assert "refusal_or_boilerplate  1" in text and "not_english" not in text
    assert "train:2 [refusal_or_boilerplate, unnamed_reference] Q: What does this paper conclude" in text


def test_index_page_keeps_gx_index_and_lists_what_failed(tmp_path):
    (tmp_path / "index.html").write_text("gx's own index")
    page = tmp_path / "validations" / "qa_pairs_rows" / "run.html"
    page.parent.mkdir(parents=True)
    page.write_text("gx page")
    write_index_html(tmp_path, failing_outcome(), P)
    assert (tmp_path / "gx_index.html").read_text() == "gx's own index"
    index = (tmp_path / "index.html").read_text()
    assert "Gate FAILED" in index and 'href="validations/qa_pairs_rows/run.html"' in index
    failed = index.split("<h2>Failed expectations</h2>")[1].split("</ul>")[0]
    assert "<code>max_fail_rate</code> (0.5)" in failed and "<code>unnamed_reference</code> (1 rows)" in failed
    assert "not_english" not in failed


# ---------------------------------------------------------------------------------------------------------------
# run (the dataset writer) and the import cost

def test_save_dataset_keeps_columns_and_order_and_stores_mixed_chunks_as_strings(tmp_path):
    import datasets

    from stages.validate.run import save_dataset

    train = [pair("First question here?", "First answer."), pair("Second question here?", "Second answer.",
                                                                 chunk="2")]
    out = tmp_path / "dataset"
    save_dataset(train, [pair("Third question here?", "Third answer.")], out)
    dd = datasets.load_from_disk(str(out))
    cols = dd["train"].to_dict()
    assert list(cols)[:3] == ["question", "answer", "doi"]
    assert cols["question"] == ["First question here?", "Second question here?"] and cols["chunk"] == ["0", "2"]
    assert dd["eval"].to_dict()["chunk"] == ["0"]
    save_dataset(train[:1], train[1:], out)                                    # replaces the folder
    dd = datasets.load_from_disk(str(out))
    assert (dd["train"].num_rows, dd["eval"].num_rows) == (1, 1) and not list(tmp_path.glob(".*"))


def test_every_part_imports_light():
    """`python -m stages.validate --help` imports them all: GX, datasets and torch load only when used."""
    code = ("import sys, stages.validate.run, stages.validate.features; heavy = [m for m in ('great_expectations', "
            "'datasets', 'torch', 'sentence_transformers', 'pandas') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


def test_save_dataset_writes_an_empty_eval_split_that_loads_back(tmp_path):
    """An empty eval split (allowed by `min_eval_rows: 0`) crashed with IndexError at the split
    (datasets 5.2's `select(range(n, n))` on n rows), and a 0-row split was saved with no shard at all, which
    `load_from_disk` cannot read back."""
    import datasets

    from stages.validate.run import save_dataset

    train = [pair("First question here?", "First answer."), pair("Second question here?", "Second answer.")]
    save_dataset(train, [], tmp_path / "dataset")
    dd = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert (dd["train"].num_rows, dd["eval"].num_rows) == (2, 0)
    assert dd["eval"].features == dd["train"].features                        # same columns, same types
    assert dd["train"].to_dict()["question"] == ["First question here?", "Second question here?"]


def test_save_dataset_with_no_rows_at_all_loads_back_with_the_schema_columns(tmp_path):
    import datasets

    from qrb.schema import PAIR_FIELDS
    from stages.validate.run import save_dataset

    save_dataset([], [], tmp_path / "dataset")
    dd = datasets.load_from_disk(str(tmp_path / "dataset"))
    assert (dd["train"].num_rows, dd["eval"].num_rows) == (0, 0)
    assert dd["train"].column_names == list(PAIR_FIELDS)
    assert dd["train"].features["chunk"].dtype == "int64" and dd["eval"].features["question"].dtype == "string"
