"""The validate stage with knowledge augmentation: a fact's variants are never duplicates of each other,
the gate counts facts, and the seen split ("seen papers, new questions") is checked against the clean training
pairs, passed on to evaluate and never put in the training dataset. Small hand-made papers, no corpus."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from helpers import run_validate, validate_workspace
from stages.validate import ValidateParams
from stages.validate.core import summary, validate
from stages.validate.features import dataset_columns, row_features, seen_columns

REPO = Path(__file__).resolve().parent.parent

P = ValidateParams(min_question_chars=15, max_question_chars=400, min_answer_chars=10, max_answer_chars=2000,
                   min_rows=1, max_fail_rate=0.5, max_paper_share=1.0, min_grounding=0.5, min_similarity=0.0,
                   min_eval_rows=0, max_eval_fraction=0.9)

X = {"doi": "10.22331/q-2024-10-23-1504", "published": "2024-10-23",
     "title": "Option pricing under stochastic volatility on a quantum computer",
     "abstract": "We develop quantum algorithms for pricing Asian and barrier options under the Heston model. The weak "
                 "Euler method needs fewer qubits than the exact simulation. Our resource estimates show a quadratic "
                 "speedup over classical Monte Carlo sampling."}
Y = {"doi": "10.22331/q-2024-06-11-1364", "published": "2024-06-11",
     "title": "TensorKrowch: Smooth integration of tensor networks in machine learning",
     "abstract": "TensorKrowch is an open source Python library built on top of PyTorch. Users can construct tensor "
                 "networks and train them as layers of deep learning models. The library supports matrix product "
                 "states and tree tensor networks."}
Z = {"doi": "10.22331/q-2021-11-10-574", "published": "2021-11-10",
     "title": "High-precision quantum algorithms for partial differential equations",
     "abstract": "We develop quantum algorithms for linear partial differential equations. The complexity is "
                 "polynomial in the dimension and logarithmic in the inverse error. Our methods improve on earlier "
                 "quantum linear system approaches."}
PAPERS = [X, Y, Z]


def row(paper: dict, question: str, answer: str, fact: str | None, variant: int = 0, **extra) -> dict:
    out = {"question": question, "answer": answer, "doi": paper["doi"], "title": paper["title"],
           "published": paper["published"], "prompt_id": "factual", "model": "m", "response_id": f"r-{question}",
           "chunk": 0, "fact_id": fact, "variant": variant, **extra}
    if fact is None:
        del out["fact_id"]
    return out


def ask(paper: dict, about: str) -> str:
    return f'What does "{paper["title"]}" report about {about}?'


EULER_A = "The weak Euler method needs fewer qubits than the exact simulation."
SPEEDUP_A = "Our resource estimates show a quadratic speedup over classical Monte Carlo sampling."
PYTORCH_A = "TensorKrowch is an open source Python library built on top of PyTorch."
MPS_A = "The library supports matrix product states and tree tensor networks."
PDE_A = "The complexity is polynomial in the dimension and logarithmic in the inverse error."


def euler_fact() -> list[dict]:
    """Fact "euler" in four wordings, as augmentation writes them: the same question with a reworded answer, the
    question again up to case and punctuation with another answer, and a reworded question."""
    q = ask(X, "the weak Euler method")
    return [row(X, q, EULER_A, "euler", 0),
            row(X, q, "The paper reports that the weak Euler method needs fewer qubits than the exact simulation.",
                "euler", 1),
            row(X, "  " + q.upper().replace("?", " ?"), "Fewer qubits than the exact simulation: the weak Euler "
                "method needs fewer.", "euler", 2),
            row(X, f'According to "{X["title"]}", how many qubits does the weak Euler method need?', EULER_A,
                "euler", 3)]


# ---------------------------------------------------------------------------------------------------------------
# duplicates: variants of one fact are not, other facts' repeats are

def test_variants_of_one_fact_are_never_duplicates_but_other_facts_repeats_are():
    euler = euler_fact()
    q = euler[0]["question"]
    train = euler + [
        row(X, q, SPEEDUP_A, "speedup"),                                  # another fact, the same question
        row(X, q.lower().rstrip("?") + " ?", SPEEDUP_A, "speedup-2"),    # another fact, the same up to case
        row(X, q, SPEEDUP_A, None),                                       # no fact_id: no fact to share it with
        row(Y, ask(Y, "PyTorch"), PYTORCH_A, "pytorch"),
        row(Y, ask(Y, "PyTorch"), MPS_A, "pytorch", 1),                   # the same question, another answer
    ]
    outcome = validate(train, [], PAPERS, P)
    assert outcome.reasons == {"train:5": ["duplicate_question"], "train:6": ["near_duplicate_question"],
                               "train:7": ["missing_field", "duplicate_question"]}
    assert outcome.train == euler + train[-2:] and outcome.gate_passed


def test_identical_or_near_identical_rows_are_duplicates_whatever_their_fact():
    """The exemption is for a fact's different wordings: the same row again (so the same fact_id), or again up to
    case, spacing and punctuation, is a duplicate."""
    good = row(Y, ask(Y, "PyTorch"), PYTORCH_A, "pytorch")
    near = row(Y, "  " + good["question"].upper(), PYTORCH_A.lower().rstrip("."), "pytorch", 2)
    outcome = validate([good, dict(good), dict(good, variant=1), near], [], PAPERS, P)
    assert outcome.reasons == {"train:2": ["duplicate_question"], "train:3": ["duplicate_question"],
                               "train:4": ["near_duplicate_question"]}
    assert outcome.train == [good]


def test_a_variant_repeat_across_splits_is_still_caught_by_the_split_check():
    euler = euler_fact()
    outcome = validate(euler[:2], euler[2:3], PAPERS, P)                 # one fact's variants in train and eval
    assert outcome.quarantine == []
    assert {c.reason for c in outcome.dataset_results if not c.success} == {"split_disjoint"}


def test_row_features_scope_the_seen_split_apart():
    q = ask(X, "the weak Euler method")
    rows = [("train", 1, row(X, q, EULER_A, "euler")),
            ("seen", 1, row(X, q, EULER_A, "euler", source_question=q)),                # vs train: the seen suite's
            ("seen", 2, row(X, q, EULER_A, "euler", source_question=q))]                # within seen: a duplicate
    f = row_features(rows, {X["doi"]: X}, P)
    assert [r["first_exact"] for r in f] == [True, True, False]
    assert [r["fact_id"] for r in f] == ["euler"] * 3


# ---------------------------------------------------------------------------------------------------------------
# the gate counts facts

def test_dataset_columns_count_a_facts_variants_once():
    feats = [{"row_id": f"train:{i}", "split": "train", "doi": d, "fact_id": fct}
             for i, (d, fct) in enumerate([("x", "a"), ("x", "a"), ("x", "a"), ("y", "b"), ("y", "")], 1)]
    feats.append({"row_id": "eval:1", "split": "eval", "doi": "z", "fact_id": "e"})
    cols = dataset_columns(feats, [True, False, False, False, False, False])     # a's variant 0 failed
    assert cols["clean_train"] == [0, 1, 0, 1, 1, 0]                    # a counted on its first clean row; "" alone
    assert cols["clean_eval"] == [0, 0, 0, 0, 0, 1]
    assert cols["train_paper_share"][1:5] == [1 / 3, 1 / 3, 2 / 3, 2 / 3]
    eval_share = [v for v in cols["eval_share"] if v == v]              # NaN where a row is no fact's first
    assert eval_share == [0.0, 0.0, 0.0, 1.0]


def test_the_gate_counts_facts_not_variants():
    euler = euler_fact()                                                # 4 rows, 1 fact, paper X
    train = euler + [row(Y, ask(Y, "PyTorch"), PYTORCH_A, "pytorch")]   # 1 row, 1 fact, paper Y
    eval_ = [row(Z, ask(Z, "the complexity"), PDE_A, "pde")]

    def checks(**kw):
        o = validate(train, eval_, PAPERS, dataclasses.replace(P, **kw))
        assert o.quarantine == []
        return {c.reason: c for c in o.dataset_results}

    c = checks(min_rows=3, max_paper_share=0.6, max_eval_fraction=0.3)
    assert (c["min_rows"].success, c["min_rows"].observed) == (False, 2)           # 5 rows, but 2 facts
    assert c["max_paper_share"].success and c["max_paper_share"].observed == 0.5  # rows would say 4/5
    assert not c["max_eval_fraction"].success                                      # rows would say 1/6
    assert c["max_eval_fraction"].observed == pytest.approx(1 / 3)
    assert c["min_eval_rows"].observed == 1
    assert all(x.success for x in checks(min_rows=2, max_paper_share=0.5, max_eval_fraction=0.34).values())


def test_a_fact_whose_first_wording_fails_still_counts_through_its_other_variants():
    euler = euler_fact()
    euler[0]["answer"] = "The stock market tends to rise in December according to historical records."
    o = validate(euler, [], PAPERS, dataclasses.replace(P, min_rows=1))
    assert o.reasons == {"train:1": ["ungrounded"]}
    assert {c.reason: c.observed for c in o.dataset_results}["min_rows"] == 1


# ---------------------------------------------------------------------------------------------------------------
# the seen split

def seen_row(paper: dict, question: str, answer: str, fact: str | None, source: str) -> dict:
    return row(paper, question, answer, fact, 0, prompt_id="paraphrase", source_question=source)


@pytest.fixture(scope="module")
def seen_case():
    euler = euler_fact()
    speedup_q, mps_q = ask(X, "the quantum speedup"), ask(Y, "matrix product states")
    train = euler + [row(X, speedup_q, SPEEDUP_A, "speedup"),
                     row(Y, ask(Y, "PyTorch"), PYTORCH_A, "pytorch"),
                     row(Y, mps_q, "The stock market tends to rise in December according to historical records.",
                         "mps")]                                        # mps: its only pair is quarantined
    eval_ = [row(Z, ask(Z, "the complexity"), PDE_A, "pde")]
    q0 = euler[0]["question"]
    new_q = f'In "{X["title"]}", which simulation method gets by with fewer qubits?'
    seen = {
        "good": seen_row(X, new_q, EULER_A, "euler", q0),
        "good_other_fact": seen_row(Y, f'Which deep learning framework is "{Y["title"]}" built on?', PYTORCH_A,
                                    "pytorch", ask(Y, "PyTorch")),
        "fact_quarantined": seen_row(Y, f'Which tensor network families does "{Y["title"]}" support?', MPS_A,
                                     "mps", mps_q),
        "fact_unknown": seen_row(X, f'Which options does "{X["title"]}" price with quantum algorithms?',
                                 "We develop quantum algorithms for pricing Asian and barrier options.", "nope", q0),
        "fact_in_eval": seen_row(Z, f'How does the complexity in "{Z["title"]}" scale with the dimension?', PDE_A,
                                 "pde", ask(Z, "the complexity")),
        "fact_of_another_paper": seen_row(Y, f'Which library does "{Y["title"]}" describe, and built on what?',
                                          PYTORCH_A, "euler", q0),
        "exact_train_question": seen_row(X, euler[3]["question"], EULER_A, "euler", q0),   # a variant's wording
        "near_train_question": seen_row(X, speedup_q.upper(), EULER_A, "euler", q0),      # another fact's, near
        "repeats_seen": seen_row(X, new_q, EULER_A, "euler", q0),
        "refusal": seen_row(X, f'Which classical baseline does "{X["title"]}" beat, and by how much?',
                            "I'm sorry, but I cannot answer questions about this paper.", "speedup", speedup_q),
        "no_fact_id": seen_row(X, f'Why does "{X["title"]}" use the weak Euler method at all?', EULER_A, None, q0),
    }
    outcome = validate(train, eval_, PAPERS, P, seen=list(seen.values()))
    ids = {name: f"seen:{i}" for i, name in enumerate(seen, 1)}
    return outcome, seen, ids, train, eval_


SEEN_REASONS = {
    "fact_quarantined": ["seen_fact_untrained"],
    "fact_unknown": ["seen_fact_untrained"],
    "fact_in_eval": ["seen_fact_untrained"],
    "fact_of_another_paper": ["seen_fact_untrained"],
    "exact_train_question": ["seen_question_in_train"],
    "near_train_question": ["seen_question_in_train"],
    "repeats_seen": ["duplicate_question"],
    "refusal": ["refusal_or_boilerplate", "ungrounded"],
    "no_fact_id": ["missing_field", "seen_fact_untrained"],
}


@pytest.mark.parametrize("name", sorted(SEEN_REASONS))
def test_a_bad_seen_row_is_quarantined_with_its_reason(seen_case, name):
    outcome, _, ids, *_ = seen_case
    assert outcome.reasons.get(ids[name]) == SEEN_REASONS[name]
    q = next(q for q in outcome.quarantine if q["row_id"] == ids[name])
    assert q["split"] == "seen" and q["line"] == int(ids[name].split(":")[1])


def test_good_seen_rows_pass_through_untouched_and_never_reach_the_dataset(seen_case):
    outcome, seen, ids, train, eval_ = seen_case
    assert outcome.seen == [seen["good"], seen["good_other_fact"]]
    assert outcome.gate_passed
    assert outcome.train == train[:-1] and outcome.eval == eval_                   # mps's pair alone quarantined
    assert {q["row_id"] for q in outcome.quarantine} == {ids[n] for n in SEEN_REASONS} | {"train:7"}


def test_seen_metrics_are_their_own_and_leave_the_gates_numbers_alone(seen_case):
    outcome, seen, _, train, eval_ = seen_case
    m = outcome.metrics
    assert m["rows_in"] == {"train": len(train), "eval": 1, "total": len(train) + 1}
    assert m["rows_quarantined"] == 1 and m["fail_rate"] == round(1 / (len(train) + 1), 4)
    assert m["row_failures"]["ungrounded"] == 1 and m["row_failures"]["duplicate_question"] == 0
    s = m["seen"]
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"]) == (len(seen), 2, len(SEEN_REASONS))
    assert s["row_failures"]["seen_fact_untrained"] == 5 and s["row_failures"]["seen_question_in_train"] == 2
    assert s["row_failures"]["duplicate_question"] == 1 and s["row_failures"]["ungrounded"] == 1
    text = summary(outcome)
    assert f"seen questions (scored, never trained on): {len(seen)} in, 2 clean, {len(SEEN_REASONS)} quarantined" \
        in text
    assert re.search(r"seen_fact_untrained\s+5\n", text)
    n = len(train)
    assert f"{n + 1} in (train {n}, eval 1), {n} clean (train {n - 1}, eval 1), 1 quarantined ({1 / (n + 1):.1%})" \
        in text                                                         # the gate's numbers: train and eval only


def test_a_failing_seen_split_never_closes_the_gate():
    euler = euler_fact()
    bad = [seen_row(X, f'What does "{X["title"]}" say about topic number {i}?', "As an AI, I cannot answer that.",
                    "euler", euler[0]["question"]) for i in range(6)]
    outcome = validate(euler, [], PAPERS, dataclasses.replace(P, max_fail_rate=0.0), seen=bad)
    assert outcome.gate_passed and outcome.seen == [] and outcome.metrics["fail_rate"] == 0.0
    assert outcome.metrics["seen"]["rows_quarantined"] == 6


def test_seen_columns_judge_against_clean_training_rows_only():
    q = ask(X, "the weak Euler method")
    feats = [{"row_id": "train:1", "split": "train", "doi": X["doi"], "fact_id": "a", "question": q},
             {"row_id": "train:2", "split": "train", "doi": X["doi"], "fact_id": "b", "question": "Failed one?"},
             {"row_id": "seen:1", "split": "seen", "doi": X["doi"], "fact_id": "a", "question": "A new one?"},
             {"row_id": "seen:2", "split": "seen", "doi": X["doi"], "fact_id": "b", "question": "failed ONE"},
             {"row_id": "seen:3", "split": "seen", "doi": Y["doi"], "fact_id": "a", "question": q + " "}]
    cols = seen_columns(feats, [False, True, False, False, False])
    assert cols == {"row_id": ["seen:1", "seen:2", "seen:3"], "fact_trained": [True, False, False],
                    "question_unseen": [True, True, False]}
    assert seen_columns(feats[:2], [False, False]) == {"row_id": [], "fact_trained": [], "question_unseen": []}


# ---------------------------------------------------------------------------------------------------------------
# the stage

def workspace(root: Path, train: list, eval_: list, seen: list | None, **overrides) -> Path:
    return validate_workspace(root, {**dataclasses.asdict(P), **overrides}, PAPERS, train, eval_, seen)


run_stage = run_validate


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_stage_writes_the_clean_seen_rows_apart_from_the_dataset(tmp_path, seen_case):
    outcome, seen, ids, train, eval_ = seen_case
    ws = workspace(tmp_path, train, eval_, list(seen.values()))
    r = run_stage(ws)
    assert r.returncode == 0, r.stderr
    out = ws / "artifacts/validate"
    assert lines(out / "seen.jsonl") == [seen["good"], seen["good_other_fact"]]
    assert lines(out / "train.jsonl") == train[:-1] and lines(out / "eval.jsonl") == eval_
    import datasets

    dd = datasets.load_from_disk(str(out / "dataset"))
    assert set(dd) == {"train", "eval"} and (dd["train"].num_rows, dd["eval"].num_rows) == (len(train) - 1, 1)
    assert "source_question" not in dd["train"].column_names and dd["train"].features["variant"].dtype == "int64"
    assert {q["split"] for q in lines(out / "quarantine.jsonl")} == {"train", "seen"}
    m = json.loads((ws / "reports/validate.json").read_text())
    assert m["seen"]["rows_out"] == 2 and m["rows_out"]["total"] == len(train)
    index = (ws / "reports/data_docs/index.html").read_text()
    assert "qa_pairs_seen" in index and "<code>seen_fact_untrained</code>" in index
    assert "seen questions (scored, never trained on)" in r.stderr


def test_stage_with_an_empty_seen_file_writes_an_empty_seen_output(tmp_path):
    ws = workspace(tmp_path, euler_fact(), [], [])
    r = run_stage(ws)
    assert r.returncode == 0, r.stderr
    assert (ws / "artifacts/validate/seen.jsonl").read_text() == ""
    s = json.loads((ws / "reports/validate.json").read_text())["seen"]
    assert (s["rows_in"], s["rows_out"], s["rows_quarantined"]) == (0, 0, 0)
    assert {"missing_field", "seen_fact_untrained", "seen_question_in_train"} <= set(s["row_failures"])
    assert not any(s["row_failures"].values())


def test_stage_without_a_seen_file_is_a_one_line_error(tmp_path):
    ws = workspace(tmp_path, euler_fact(), [], None)
    r = run_stage(ws)
    assert r.returncode == 78 and "Traceback" not in r.stderr
    assert "validate: artifacts/generate/seen.jsonl not found (run the generate stage first)" in r.stderr
    assert not (ws / "artifacts/validate").exists()
