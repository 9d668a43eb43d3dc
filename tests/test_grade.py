"""The offline short-answer grader (qrb/grade.py): every gameable case of the old fact metric, and more
adversarial answers (units, ranges, scientific notation, hedges, lists, abstentions)."""

from __future__ import annotations

import pytest

from qrb.grade import CORRECT, INCORRECT, NOT_ATTEMPTED, grade, is_abstention
from qrb.schema import ABSTAIN_ANSWER

KRYLOV_Q = "As of September 2024, how many qubits has the quantum Krylov algorithm been demonstrated on experimentally?"
FIPS_Q = "What algorithms does the quantum FIPS 205 deal with?"
VARIANCE_Q = ("What is the variance which you can get with polynomial bond dimension in pure quantum states in one "
              "dimensional systems?")
SWAP_Q = ("In the analysis of noise effects in controlled-swap gate circuits, what percentage of errors were eliminated "
          "with a dephasing error probability of 10% when using two noisy copies of a quantum state?")
CARD1_Q = "On top of what platform is TensorKrowch built on and where was it created?"


# The old fact metric's table: each row was scored wrongly by fact recall; each is graded right here.
@pytest.mark.parametrize(("answer", "gold", "question", "expected"), [
    ("On 5, 10, 20, 27, 53, 56, … 433 qubits.", "56 qubits", KRYLOV_Q, INCORRECT),
    ("See Ref. [56].", "56 qubits", KRYLOV_Q, INCORRECT),
    ("It has not yet been demonstrated on 56 qubits.", "56 qubits", KRYLOV_Q, INCORRECT),
    ("Not SLH-DSA; it deals with ML-DSA, a lattice-based digital signature algorithm.", "SLH-DSA", FIPS_Q, INCORRECT),
    ("It is as large as N log N.", "∝ 1/log N", VARIANCE_Q, INCORRECT),
    ("It deals with SLH-DSA.", "SLH-DSA", FIPS_Q, CORRECT),
    ("They used 127 qubits.", "127 superconducting qubits", "How many qubits did the experiment use?", CORRECT),
])
def test_the_old_metrics_gameable_cases(answer, gold, question, expected):
    assert grade(answer, gold, question=question) == expected


@pytest.mark.parametrize(("answer", "gold", "expected"), [
    ("Twenty-one qubits.", "21 qubits", CORRECT),                      # number words, hyphenated
    ("It used 21 qubits.", "twenty-one qubits", CORRECT),
    ("About two thirds of them.", "67%", CORRECT),                      # a fraction in words = a percentage
    ("A fidelity of 0.995.", "99.5%", CORRECT),                          # a decimal = a percentage
    ("A fidelity of 99.5 percent.", "0.995", CORRECT),
    ("A fidelity of 99.4%.", "99.5%", INCORRECT),                        # within the gold's last digit only
    ("Roughly 1,000 shots.", "1000 shots", CORRECT),                     # thousands separator
    ("One thousand shots.", "1000 shots", CORRECT),
    ("An error rate of 1e-3.", "10^-3", CORRECT),                        # scientific notation, every spelling
    ("An error rate of 0.001.", "10^-3", CORRECT),
    ("An error rate of 1 × 10⁻³.", "0.001", CORRECT),
    ("An error rate of 0.1%.", "10^-3", CORRECT),
    ("An error rate of 10^-4.", "10^-3", INCORRECT),
    ("1.5 million gates.", "1.5 × 10^6 gates", CORRECT),
    ("It ran on 56 ions.", "56 qubits", INCORRECT),                      # units that disagree
    ("It ran on 56 superconducting qubits.", "56 qubits", CORRECT),
    ("Up to 56.", "56 qubits", CORRECT),                                 # no unit in the answer: the value decides
    ("More than 56 qubits.", "56 qubits", INCORRECT),                    # a bound is not the value
    ("In 2024 it was run on 56 qubits.", "56 qubits", CORRECT),          # a year is no rival value
])
def test_numbers_match_across_words_units_percent_decimals_and_notation(answer, gold, expected):
    assert grade(answer, gold) == expected, answer


@pytest.mark.parametrize(("answer", "gold", "expected"), [
    ("Between 50 and 60 qubits.", "56 qubits", INCORRECT),               # a range around the gold is a hedge
    ("Between 53 and 56 qubits.", "56 qubits", INCORRECT),
    ("5 to 10 qubits.", "5-10 qubits", CORRECT),                        # a range gold needs both ends
    ("From five to ten qubits.", "5–10 qubits", CORRECT),
    ("10 qubits.", "5-10 qubits", INCORRECT),
    ("Either 53 or 56 qubits.", "56 qubits", INCORRECT),                  # hedges between values
    ("Probably 56 qubits, though maybe 127.", "56 qubits", INCORRECT),
    ("I think it was 56 qubits.", "56 qubits", CORRECT),                  # hedging words alone do not matter
    ("It was 56 qubits, not 53 qubits.", "56 qubits", CORRECT),           # a negated rival is no rival
    ("No, it was demonstrated on 56 qubits.", "56 qubits", CORRECT),
    ("Was it 56 qubits? I don't know.", "56 qubits", NOT_ATTEMPTED),     # a question states nothing
    ("It deals with SLH-DSA or ML-DSA.", "SLH-DSA", INCORRECT),          # lists and hedges of names
    ("It covers ML-DSA, SLH-DSA and XMSS.", "SLH-DSA", INCORRECT),
    ("It is built on PyTorch, TensorFlow and JAX.", "PyTorch", INCORRECT),
    ("It deals with SLH-DSA, not ML-DSA.", "SLH-DSA", CORRECT),
    ("ML-DSA.", "SLH-DSA", INCORRECT),                                   # a shared suffix is not the name
    ("It deals with the stateless hash-based signature standard.", "stateless hash-based signature (SLH-DSA)", CORRECT),
    ("It scales as 1/log N or as N log N.", "∝ 1/log N", INCORRECT),
    ("The variance is as small as 1/log(N).", "∝ 1/log N", CORRECT),
])
def test_ranges_hedges_lists_and_negations(answer, gold, expected):
    assert grade(answer, gold, question=VARIANCE_Q if "log" in gold else "") == expected, answer


def test_names_match_by_their_distinctive_part_and_a_lone_letter_is_no_name():
    gold = "PyTorch; University of Madrid"
    assert grade("TensorKrowch is built on top of the PyTorch framework and was created at the University of Madrid",
                 gold, question=CARD1_Q) == CORRECT
    assert grade("It is built on pytorch and was written in Madrid.", gold, question=CARD1_Q) == CORRECT
    assert grade("It is built on PyTorch.", gold, question=CARD1_Q) == INCORRECT  # half the gold
    assert grade("It uses the loop Hafnians of the state.", "loop Hafnian") == CORRECT
    assert grade("It is expressed with the permanent.", "loop Hafnian") == INCORRECT
    assert grade("It is the Hafnian.", "loop Hafnian") == INCORRECT  # every distinctive word, not the generic one
    # "N" alone is no name: an answer with some other N does not state "N log N"
    assert grade("N qubits.", "N log N") == INCORRECT
    assert grade("The cost grows as N log N.", "N log N") == CORRECT


def test_the_card_questions_short_answers():
    assert grade("The FIPS 205 deals with the stateless hash-based digital signature algorithm (SLH-DSA).", "SLH-DSA",
                 ["stateless hash-based signature"], FIPS_Q) == CORRECT
    assert grade("67% of errors were eliminated.", "67%", ["two thirds"], SWAP_Q) == CORRECT
    # the question's own values (10%, two copies) are context, not rival answers
    assert grade("With two copies at 10% dephasing, 67% of errors were eliminated.", "67%", (), SWAP_Q) == CORRECT
    assert grade("With two copies, 50% of errors were eliminated.", "67%", (), SWAP_Q) == INCORRECT
    assert grade("The quantum Krylov algorithm has been demonstrated on up to 56 qubits experimentally.", "56 qubits",
                 ["fifty-six qubits"], KRYLOV_Q) == CORRECT


@pytest.mark.parametrize("answer", [
    ABSTAIN_ANSWER, "I don't know that paper.", "I'm not sure.", "I do not know.", "Not sure.",
    "I'm not familiar with that paper, so I cannot answer.", "I have no information about this work.",
    "Sorry, I can't answer that question.", "I haven't read that paper.", "The paper does not say.", "",
])
def test_abstentions_are_not_attempted(answer):
    assert answer == "" or is_abstention(answer)
    assert grade(answer, "56 qubits", question=KRYLOV_Q) == NOT_ATTEMPTED
    assert grade(answer, "") == NOT_ATTEMPTED  # an invented paper: declining is right


def test_an_abstention_with_a_guess_is_an_attempt():
    assert grade("I'm not sure, but I think it was 56 qubits.", "56 qubits") == CORRECT
    assert grade("I'm not sure; maybe 53 qubits.", "56 qubits", question=KRYLOV_Q) == INCORRECT
    assert grade("I don't know, perhaps ML-DSA.", "SLH-DSA", question=FIPS_Q) == INCORRECT
    assert grade("I don't know that paper.", "SLH-DSA", question=FIPS_Q) == NOT_ATTEMPTED
    assert not is_abstention("It deals with SLH-DSA.") and not is_abstention("It has not been shown on 56 qubits.")


def test_without_a_gold_any_attempt_is_invented():
    assert grade("The paper reports 56 qubits.", "") == INCORRECT
    assert grade("It proposes a new error-correcting code.", "", ()) == INCORRECT
    assert grade(ABSTAIN_ANSWER, "", ()) == NOT_ATTEMPTED
