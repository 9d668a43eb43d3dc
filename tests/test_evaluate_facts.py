"""Fact recall (stages/evaluate/facts.py): key facts, their matching, IDF weights, style vs facts, paired gains."""

from __future__ import annotations

import numpy as np
import pytest

from stages.evaluate.facts import MIN_WEIGHT, FactScorer, Idf, normalise_number
from stages.evaluate.metrics import aggregate, bootstrap_indices, paired_gains

ABSTRACTS = [
    "We study quantum states of many-body systems and show a new method for quantum circuits.",
    "Quantum error correction with surface codes: we show thresholds for quantum memories.",
    "A quantum algorithm for ground states of molecules, with a framework for variational circuits.",
    "TensorKrowch is a library for quantum tensor networks in machine learning, built on PyTorch.",
    "We show that quantum Krylov methods estimate energies of quantum systems on hardware.",
]
CARD1_Q = "On top of what platform is TensorKrowch built on and where was it created?"
CARD1_REF = ("TensorKrowch is built on top of the PyTorch framework and was created at the University of Madrid")
KRYLOV_Q = "How many qubits has the quantum Krylov algorithm been demonstrated on experimentally?"
KRYLOV_REF = "The quantum Krylov algorithm has been demonstrated on up to 56 qubits experimentally."


@pytest.fixture(scope="module")
def facts() -> FactScorer:
    return FactScorer(ABSTRACTS)


def texts(fs: FactScorer, q: str, ref: str) -> dict[str, str]:
    return {f.text: f.kind for f in fs.key_facts(q, ref)}


def test_key_facts_are_the_numbers_names_and_terms_the_question_does_not_contain(facts):
    card1 = texts(facts, CARD1_Q, CARD1_REF)
    assert card1 == {"PyTorch": "name", "framework": "term", "University of Madrid": "name"}
    # in the question (stem-matched: "created" = "created", "built" = "built") or stop words: no key facts
    assert facts.score(CARD1_Q, CARD1_REF, "It was made at a university.")["facts_found"] == []
    assert facts.score(CARD1_Q, CARD1_REF, "Researchers in Madrid.")["facts_found"] == ["University of Madrid"]
    assert texts(facts, "Who?", "Thanks to PyTorch, Madrid. Names: Alice Smith (Oxford)") == {
        "Thanks": "term", "PyTorch": "name", "Madrid": "name", "Names": "term", "Alice Smith": "name", "Oxford": "name"}
    assert texts(facts, KRYLOV_Q, KRYLOV_REF) == {"56 qubits": "number"}
    pct = texts(facts, "What share of errors did two noisy copies remove at a 10% dephasing rate?",
                "67% of errors were eliminated when using two copies with a dephasing error probability of 10%.")
    assert pct == {"67%": "number", "eliminated": "term", "probability": "term"}  # 10% and two are in the question
    assert texts(facts, "Which algorithm does FIPS 205 specify?",
                 "FIPS 205 specifies SLH-DSA, a stateless hash-based signature.")["SLH-DSA"] == "name"
    # every fact of the reference is in the question: nothing to score, not a zero
    r = facts.score("Is TensorKrowch built on PyTorch?", "TensorKrowch is built on PyTorch.", "Yes.")
    assert r["fact_recall"] is None and r["key_facts"] == []


def test_numbers_and_words_match_normalised(facts):
    recall = lambda ans: facts.score(KRYLOV_Q, KRYLOV_REF, ans)["fact_recall"]  # noqa: E731
    assert recall("It ran on 56 qubits.") == 1.0
    assert recall("Up to 56 so far.") == 1.0            # the number without a unit states it
    assert recall("It ran on 56 atoms.") == 0.0          # with another unit it is another fact
    assert recall("It ran on 5 qubits and 6 ions.") == 0.0
    ref = "The surface code threshold is about one percent, with 1,000 rounds at rate 0.50."
    q = "What is the surface code threshold?"
    assert {f.text for f in facts.key_facts(q, ref)} >= {"one percent", "1,000 rounds", "0.50"}
    got = facts.score(q, ref, "Roughly 1% with 1000 rounds at rate 0.5.")
    assert set(got["facts_found"]) >= {"one percent", "1,000 rounds", "0.50"}
    assert [normalise_number(x) for x in ("1,000", "0.50", "5.0", "007", "two", "0", ".5")] == \
        ["1000", "0.5", "5", "7", "2", "0", "0.5"]
    # stems: plural and inflected forms state the same term
    assert facts.score("What is new?", "Frameworks were developed.", "a framework developed")["fact_recall"] == 1.0


def test_generic_words_weigh_next_to_nothing_by_idf():
    idf = Idf(ABSTRACTS)
    assert idf.weight("quantum") < MIN_WEIGHT  # in every abstract
    assert idf.weight("madrid") == 1.0 and 0 < idf.weight("framework") < 1.0
    fs = FactScorer(ABSTRACTS)
    assert "quantum" not in texts(fs, "What is shown?", "A quantum Madrid framework.")
    assert FactScorer([]).idf.weight("quantum") == 1.0  # no abstracts: all words alike


def test_fact_recall_tells_style_from_facts(facts):
    """A "style" answer (short, in the reference's words, without the name or number) scores higher ROUGE than a
    long answer that states the facts in other words, yet lower fact recall: fact recall measures knowledge."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    cases = [
        (CARD1_Q, CARD1_REF,
         "TensorKrowch is built on top of a deep learning framework and was created at a university.",
         "Its authors wrote the library in Python on the PyTorch tensor library; the group that developed it works "
         "in Madrid, Spain, and designed it so that tensor network layers can be trained like any neural layer."),
        (KRYLOV_Q, KRYLOV_REF,
         "The quantum Krylov algorithm has been demonstrated experimentally on many qubits.",
         "Experiments reported so far ran it on superconducting hardware with 56 qubits, the largest such run."),
    ]
    for q, ref, style, fact in cases:
        r_style, r_fact = rouge.score(ref, style), rouge.score(ref, fact)
        assert r_style["rougeL"].fmeasure > r_fact["rougeL"].fmeasure + 0.2
        assert r_style["rouge1"].fmeasure > r_fact["rouge1"].fmeasure
        assert len(style.split()) < len(fact.split())
        s, f = facts.score(q, ref, style), facts.score(q, ref, fact)
        assert f["fact_recall"] > s["fact_recall"] + 0.4, (s, f)
        assert f["fact_recall"] >= 0.5 > s["fact_recall"]  # at least half the key facts: the fact answer only


def _rows(recalls: list[float | None], threshold: float = 0.5) -> list[dict]:
    """Scorer-shaped rows (the fields aggregate reads) with given fact recalls, and as their grade: correct at the
    threshold (a row without a key fact: no gold either)."""
    return [{"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "bertscore_p": 0.8, "bertscore_r": 0.8,
             "bertscore_f1": 0.8, "sentence_bleu": 5.0, "answer_words": 10.0, "bleu_stats": [3, 1, 0, 0, 6, 4, 3, 2,
                                                                                             5, 5],
             "fact_recall": r, "correct": None if r is None else float(r >= threshold)} for r in recalls]


def test_rates_and_paired_gains_use_the_same_resamples():
    rng = np.random.default_rng(0)
    base_r = [float(x) for x in rng.uniform(0, 0.4, 30)]
    model_r = [min(1.0, b + float(d)) for b, d in zip(base_r, rng.uniform(0.1, 0.5, 30))]
    base_r[3] = model_r[3] = None  # a reference with no key fact beyond its question: left out, for both
    base, model = _rows(base_r), _rows(model_r)
    mb, mm = aggregate(base, seed=7, samples=500), aggregate(model, seed=7, samples=500)
    assert mb["fact_n"] == mm["fact_n"] == mm["graded_n"] == 29 and mb["n"] == 30
    defined = [x for x in model_r if x is not None]
    assert mm["fact_recall"] == pytest.approx(np.mean(defined))
    assert mm["correct"] == pytest.approx(np.mean([x >= 0.5 for x in defined]))
    gains = paired_gains(model, base, seed=7, samples=500)
    diff = np.array([np.nan if m is None else m - b for m, b in zip(model_r, base_r)])
    assert gains["fact_recall_gain"] == pytest.approx(np.nanmean(diff))
    # the interval is over the same resamples as aggregate's (bootstrap_indices for this n and seed)
    idx = bootstrap_indices(30, 500, seed=7)
    means = [np.nanmean(diff[i]) for i in idx]
    assert gains["fact_recall_gain_ci95"] == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    lo, hi = gains["fact_recall_gain_ci95"]
    assert 0 < lo < gains["fact_recall_gain"] < hi  # a consistent gain: its interval excludes zero
    assert gains["correct_gain"] == pytest.approx(mm["correct"] - mb["correct"])
    # the paired interval is narrower than the difference of the two unpaired ones would suggest
    assert hi - lo < (mm["fact_recall_ci95"][1] - mm["fact_recall_ci95"][0]) + (
        mb["fact_recall_ci95"][1] - mb["fact_recall_ci95"][0])
    small = paired_gains(model[:3], base[:3], seed=7, samples=500, min_n=5)
    assert small["fact_recall_gain_ci95"] == "n too small" and "fact_recall_gain" in small
    none = aggregate(_rows([None, None]), seed=1, samples=200)
    assert none["fact_n"] == 0 and "fact_recall" not in none
