"""The smoke endpoint's fact-level writer: atomic facts with short answers, their wordings, a new wording for the seen
set and invented papers; and what generate makes of them (short answers on every row, abstention rows, the invented
question set)."""

from __future__ import annotations

import json
import re

from qrb.schema import ABSTAIN_ANSWER
from qrb.words import near_any, word_set
from stages.generate.facts import names_paper
from standins.smoke.facts import extract_facts, fact_wordings, invented_questions, new_wording

SURFACE = ("Improved Pairwise Measurement-Based Surface Code",
           "We devise a new realization of the surface code on a rectangular lattice of qubits utilizing single-qubit "
           "and nearest-neighbor two-qubit Pauli measurements and three auxiliary qubits per plaquette. It has a "
           "short operation period of 4 steps and our performance analysis yields a threshold of approximately "
           "$0.66% $.")
GAUSS = ("Photon-number moments and cumulants of Gaussian states",
         "We develop closed-form expressions for the moments of Gaussian states. We express the photon-number moments "
         "of a Gaussian state in terms of the loop Hafnian, a function that counts perfect matchings.")


def _jaccard(a: str, b: str) -> float:
    x, y = word_set(a), word_set(b)
    return len(x & y) / len(x | y)


def test_facts_are_atomic_short_answers_with_their_evidence():
    facts = extract_facts(*SURFACE, 5)
    shorts = [f["short_answer"] for f in facts]
    assert "0.66%" in shorts and "three auxiliary qubits" in shorts and "4 steps" in shorts
    three = next(f for f in facts if f["short_answer"] == "three auxiliary qubits")
    assert three["aliases"] == ["3 auxiliary qubits"]
    assert "how many auxiliary qubits" in three["question"] and "three" not in three["question"]
    assert three["evidence"].startswith("We devise")  # the paper's sentence as written, for grounding and citing
    hafnian = extract_facts(*GAUSS, 3)
    assert any(f["short_answer"].lower() == "loop hafnian" and "Hafnian" not in f["question"] for f in hafnian)
    assert len(extract_facts(*SURFACE, 1)) == 1  # capped


def test_wordings_vary_and_end_with_a_reverse_question():
    fact = {**extract_facts(*SURFACE, 5)[0], "title": SURFACE[0]}
    words = fact_wordings(fact, 7)
    assert len(words) == 7 and len({w["question"] for w in words}) == 7
    assert fact["question"] not in {w["question"] for w in words}
    titled = [w for w in words[:-1] if SURFACE[0] in w["question"]]
    assert 0 < len(titled) < 6  # with and without the title
    assert all(fact["short_answer"] not in w["question"] for w in words[:-1])
    reverse = words[-1]
    assert reverse["kind"] == "reverse" and reverse["short_answer"] == SURFACE[0]
    assert reverse["question"].startswith("Which paper reports")
    # the seen set's wording shares little with any training wording
    seen = new_wording(fact)
    assert seen.endswith("?") and fact["short_answer"] not in seen
    assert max(_jaccard(seen, w["question"]) for w in words + [fact]) < 0.6


def test_no_new_wording_gives_its_answer_away():
    acr = ("The gauge theory of measurement-based quantum computation",
           "Measurement-Based Quantum Computation (MBQC) is a model of quantum computation, which uses local "
           "measurements instead of unitary gates.")
    for title, abstract in (acr, SURFACE, GAUSS):
        for f in extract_facts(title, abstract, 5):
            fact = {**f, "title": title}
            assert f["short_answer"].lower() not in new_wording(fact).lower(), (f, new_wording(fact))
            assert all(f["short_answer"].lower() not in w["question"].lower() for w in fact_wordings(fact, 7)[:-1])


def test_invented_papers_are_deterministic_and_never_a_real_title():
    a, b = invented_questions("seed", 12), invented_questions("seed", 12)
    assert a == b and len(a) == 12 and a != invented_questions("other", 12)
    avoid = {a[0]["title"].lower()}
    assert all(q["title"].lower() not in avoid for q in invented_questions("seed", 12, avoid))
    assert all(q["question"].endswith("?") for q in a)


def test_invented_claims_splice_real_sentences_when_abstracts_are_listed():
    abstracts = [SURFACE[1], GAUSS[1]]
    spliced = invented_questions("seed", 8, real=["A title of four words", "Another title of five words"],
                                 abstracts=abstracts)
    templated = invented_questions("seed", 8)
    vocab = {w.lower() for a in abstracts for w in re.findall(r"[A-Za-z]{5,}", a)}

    def real_words(q):  # share of a question's long words found in the real abstracts
        words = [w.lower() for w in re.findall(r"[A-Za-z]{5,}", q["question"])]
        return sum(w in vocab for w in words) / max(len(words), 1)
    assert len(spliced) == 8 and spliced == invented_questions("seed", 8, real=["A title of four words",
                                                                              "Another title of five words"],
                                                               abstracts=abstracts)
    assert sum(map(real_words, spliced)) / 8 > sum(map(real_words, templated)) / 8 + 0.2
    sentences = {s.lower() for a in abstracts for s in re.split(r"(?<=\.) ", a)}
    assert not any(q["question"].lower().rstrip("?") in sentences for q in spliced)


def test_generate_writes_short_answers_abstention_rows_and_the_invented_set(tmp_path, monkeypatch):
    from generate_helpers import make_workspace, read, run_main

    import stages.generate.plan as generate_plan
    from standins.smoke.server import serve_smoke_endpoint

    listed_to_invent = []

    def recording(papers, *args):
        listed_to_invent.append(papers)
        return invent_units(papers, *args)
    invent_units = generate_plan.invent_units
    monkeypatch.setattr(generate_plan, "invent_units", recording)
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, prompts=["facts"], pairs_per_prompt=2, augment_variants=4,
                            seen_questions=50, abstain_share=0.25, invented_questions=12, eval_size=4)
        run_main(ws, monkeypatch)
    out = ws / "artifacts/generate"
    train, evals, seen, invented = (read(out / f"{n}.jsonl") for n in ("train", "eval", "seen", "invented"))
    facts = [r for r in train if r["kind"] != "abstain"]
    abstain = [r for r in train if r["kind"] == "abstain"]
    assert facts and all(r["short_answer"] and r["evidence"] for r in facts + evals + seen)
    assert all(r["short_answer"].lower() in r["evidence"].lower() or r["kind"] == "reverse" for r in facts)
    assert any(r["kind"] == "reverse" for r in facts)
    assert len(abstain) == round(0.25 * len(facts))
    assert all(r["answer"] == ABSTAIN_ANSWER and r["doi"] == "" for r in abstain + invented)
    asked = [word_set(r["question"]) for r in facts]  # an untitled one never words a real training question
    assert not any(near_any(word_set(r["question"]), asked, 0.6) for r in abstain + invented
                   if not names_paper(r["question"], r["title"]))
    assert invented and not {r["title"] for r in invented} & {r["title"] for r in abstain}
    real = {r["title"] for r in facts + evals}
    assert not {r["title"] for r in invented + abstain} & real
    metrics = json.loads((ws / "reports/generate.json").read_text())
    assert metrics["abstain_pairs"] == len(abstain) and metrics["invented_kept"] == len(invented)
    assert all(re.search(r"\?$", r["question"]) for r in seen)
    listed = {pp["doi"] for pp in listed_to_invent[-1]}  # the run's requests (the cost estimate's come first)
    assert listed and not listed & {r["doi"] for r in evals}  # no held-out paper's words teach abstention


def test_an_untitled_invented_question_worded_as_a_real_one_is_dropped():
    from stages.generate.facts import invented_rows
    from stages.generate.units import Unit

    real = "Researchers price Asian and barrier options under what model?"
    pairs = [{"question": f'In "Certified trapped-ion lattices", {real[0].lower()}{real[1:]}',  # named: invented
              "answer": "Certified trapped-ion lattices", "short_answer": "Certified trapped-ion lattices"},
             {"question": real,  # a real paper's fact, asked as training asks it: "I don't know" is wrong for it
              "answer": "Scalable fermionic braids", "short_answer": "Scalable fermionic braids"},
             {"question": "How many ancillas does the flag-qutrit lattice surgery need?",  # untitled, unlike any
              "answer": "Flag qutrits on a lattice", "short_answer": "Flag qutrits on a lattice"}]
    unit = Unit("", "", None, "invent", 0, [], "k", 0, 0, fact_id="invent-train-0")
    reply = {"content": json.dumps({"pairs": pairs}), "model": "m", "response_id": "r"}
    train, invented, dropped = invented_rows([unit], {"k": reply}, ["A real title"], 10, 0.8, [real], 0.6)
    assert [r["title"] for r in train] == ["Certified trapped-ion lattices", "Flag qutrits on a lattice"]
    assert not invented and dropped == 1
    assert names_paper("In the paper on certified trapped-ion lattices, what?", "Certified trapped-ion lattices")
    assert not names_paper("What does the certified code reach?", "Certified trapped-ion lattices")
