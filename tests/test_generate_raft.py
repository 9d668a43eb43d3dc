"""RAFT rows: training facts asked as the apps ask with retrieval (their paper's excerpt among distractors, or
distractors only), written by generate without a request: deterministic, shares respected, no held-out paper shown."""

from __future__ import annotations

import json
import re

import pytest
from generate_helpers import fake_papers, make_workspace, params_of, read, recipe, run_main

from qrb.retrieval import Passage, citations, cite, excerpts, rag_prompt, rag_question, with_citation
from stages.generate.raft import raft_rows
from stages.generate.units import build_units
from standins.smoke import serve_smoke_endpoint

TITLE_LINE = re.compile(r"(?m)^\[(\d+)\] (.+)$")


def facts_of(papers: list[dict], held: set[str]) -> tuple[list[dict], list[dict]]:
    """Train rows (per paper: a fact, its rewording, a fact of its full text; plus an abstention row) and eval rows."""
    train, evals = [], []
    for i, pp in enumerate(papers):
        fact = {"question": f"How many ancilla modes does \"{pp['title']}\" use?", "answer": f"{i + 2} modes.",
                "short_answer": str(i + 2), "aliases": [], "evidence": "", "doi": pp["doi"], "title": pp["title"],
                "published": pp["published"], "prompt_id": "facts", "model": "m", "response_id": f"r{i}", "chunk": 0,
                "fact_id": f"f{i:02d}", "variant": 0, "kind": "fact"}
        if pp["doi"] in held:
            evals.append(fact)
            continue
        train += [fact, {**fact, "question": f"In \"{pp['title']}\", how many ancilla modes?", "variant": 1},
                  {**fact, "fact_id": f"g{i:02d}", "chunk": 2, "question": f"What does \"{pp['title']}\" define?"}]
    train.append({**train[0], "question": "What does \"Photonic mayonnaise\" report?", "doi": "", "kind": "abstain",
                  "fact_id": "a0", "short_answer": ""})
    return train, evals


def shown_titles(prompt: str) -> list[str]:
    return [t for _, t in TITLE_LINE.findall(prompt)]


def test_raft_rows_are_deterministic_respect_the_shares_and_never_show_a_held_out_paper():
    papers = fake_papers()[:14]
    held = {papers[3]["doi"], papers[8]["doi"]}
    train, evals = facts_of(papers, held)
    by_title = {pp["title"]: pp for pp in papers}
    rows, counts = raft_rows(train, held, papers, 0.5, 0.25, 3, 120, seed=5)
    assert rows == raft_rows(train, held, papers, 0.5, 0.25, 3, 120, seed=5)[0]  # deterministic
    other = raft_rows(train, held, papers, 0.5, 0.25, 3, 120, seed=6)[0]
    assert [r["fact_id"] for r in other] != [r["fact_id"] for r in rows]  # ... from the seed
    # 12 eligible: variant-0 abstract facts of train papers (not the rewording, the full-text fact, the abstention)
    assert counts == {"raft_eligible_facts": 12, "raft_gold_rows": 6, "raft_distractor_rows": 3,
                      "raft_chars": sum(len(r["question"]) + len(r["answer"]) for r in rows)}
    assert len({r["fact_id"] for r in rows}) == 9 and all(r["fact_id"].startswith("f") for r in rows)
    facts = {r["fact_id"]: r for r in train if r["variant"] == 0}
    for n, r in enumerate(rows):
        fact, titles = facts[r["fact_id"]], shown_titles(r["question"])
        assert r["kind"] == r["prompt_id"] == "raft" and r["variant"] == 2 and r["doi"] == fact["doi"]
        assert not {by_title[t]["doi"] for t in titles} & held, "a held-out paper shown in training"
        assert len(titles) == len(set(titles)) == 3 and rag_question(r["question"]) == fact["question"]
        passages = [Passage(by_title[t]["doi"], t, " ".join(by_title[t]["abstract"].split())) for t in titles]
        assert r["question"] == rag_prompt(fact["question"], [(x, 0.0) for x in passages], 120)  # the apps' message
        plain, cites = cite(r["answer"], passages)
        assert plain == fact["answer"]
        if n < 6:  # gold: its paper among two distractors, cited by its number
            assert fact["title"] in titles and [c["doi"] for c in cites] == [fact["doi"]]
        else:  # distractors only: the fact from memory, citing none
            assert fact["title"] not in titles and cites == [] and r["answer"] == fact["answer"]
    assert len({shown_titles(r["question"]).index(facts[r["fact_id"]]["title"]) for r in rows[:6]}) > 1  # shuffled
    assert raft_rows(train, held, papers, 0.0, 0.0, 3, 120, seed=5) == ([], {
        "raft_eligible_facts": 12, "raft_gold_rows": 0, "raft_distractor_rows": 0, "raft_chars": 0})
    assert len(raft_rows(train, held, papers, 0.0, 1.0, 1, 120, seed=5)[0]) == 12


def test_citation_markers_round_trip_and_only_name_shown_excerpts():
    a, b = Passage("10.1/a", "Paper A", "x"), Passage("10.1/b", "Paper B", "y")
    assert with_citation("Three qubits.", 2) == "Three qubits [2]." and with_citation("Three qubits", 1) == \
        "Three qubits [1]"
    assert cite("Three qubits [2].", [a, b]) == ("Three qubits.", [{"doi": "10.1/b", "title": "Paper B",
                                                                    "url": "https://doi.org/10.1/b"}])
    assert cite("Both [2], [1, 2] and [7].", [a, b]) == ("Both, and [7].", citations([b, a]))  # [7]: no excerpt
    assert cite("A [[7,1,3]] code [1].", [a, b]) == ("A [[7,1,3]] code.", citations([a]))  # code parameters: text
    assert cite("Three qubits.", [a, b]) == ("Three qubits.", [])  # shown is not cited
    prompt = rag_prompt("How many qubits?", [(a, 0.0), (b, 0.0)], 100)
    assert [(x.title, x.text) for x in excerpts(prompt)] == [("Paper A", "x"), ("Paper B", "y")]
    assert excerpts("How many qubits?") == [] and rag_question("How many qubits?") == "How many qubits?"


@pytest.mark.parametrize("shares, match", [((0.7, 0.4), "together at most 1"), ((-0.1, 0.0), "raft_gold_share")])
def test_shares_are_checked(shares, match):
    with pytest.raises(ValueError, match=match):
        recipe(raft_gold_share=shares[0], raft_distractor_share=shares[1]).check()


def test_an_unknown_raft_key_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown key `generate\.raft_share`.*did you mean `generate\.raft_"):
        recipe(raft_share=0.5)


def test_the_stage_writes_raft_rows_from_training_papers_only(tmp_path, monkeypatch):
    """The stage against the smoke endpoint: RAFT rows join the training rows (no request), shown as the tiny
    profile's `retrieval:` shows passages, never an eval paper; a rerun writes the same bytes."""
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, prompts=["facts"], pairs_per_prompt=2, eval_size=6,
                            augment_variants=1, seen_questions=0, raft_gold_share=0.5, raft_distractor_share=0.25)
        run_main(ws, monkeypatch)
        n = ep.completions_count()
        first = (ws / "artifacts/generate/train.jsonl").read_bytes()
        run_main(ws, monkeypatch)
        assert ep.completions_count() == n and (ws / "artifacts/generate/train.jsonl").read_bytes() == first
    train, evals = read(ws / "artifacts/generate/train.jsonl"), read(ws / "artifacts/generate/eval.jsonl")
    raft = [r for r in train if r["kind"] == "raft"]
    eval_titles = {r["title"] for r in evals}
    assert raft and evals and all(len(shown_titles(r["question"])) <= 2 for r in raft)  # tiny: top_k 2
    assert not {t for r in raft for t in shown_titles(r["question"])} & eval_titles
    metrics = json.loads((ws / "reports/generate.json").read_text())
    assert metrics["raft_gold_rows"] + metrics["raft_distractor_rows"] == len(raft)
    assert metrics["train_pairs"] == len(train)


def test_validate_lets_raft_rows_through_and_quarantines_one_showing_a_held_out_paper():
    """Validate checks a RAFT row on the question it asks and the answer without its [n] (no prompt-leak, length or
    duplicate false alarm on the apps' message), and quarantines a row whose message shows an eval paper's excerpt
    or is no RAG message at all."""
    from stages.validate import ValidateParams
    from stages.validate.core import validate

    papers = fake_papers()[:12]
    held = {pp["doi"] for pp in papers[10:]}
    train, evals = facts_of(papers, held)
    train = train[:-1]  # the abstention row: not this test's
    rows, _ = raft_rows(train, held, papers, 0.5, 0.5, 2, 300, seed=1)
    leak = {**rows[0], "question": rag_prompt(rows[0]["question"].rpartition("Question: ")[2], [
        (Passage(pp["doi"], pp["title"], pp["abstract"]), 0.0) for pp in (papers[10], papers[0])], 300)}
    bare = {**rows[1], "question": rag_question(rows[1]["question"])}
    p = ValidateParams(min_question_chars=15, max_question_chars=400, min_answer_chars=5, max_answer_chars=2000,
                       min_rows=1, max_fail_rate=0.5, max_paper_share=1.0, min_grounding=0.5, min_similarity=0.0,
                       min_eval_rows=0, max_eval_fraction=0.9)
    outcome = validate(train + rows + [leak, bare], evals, papers, p)
    n = len(train) + len(rows)
    assert outcome.reasons[f"train:{n + 1}"] == ["raft_malformed"]  # shows a held-out paper
    assert "raft_malformed" in outcome.reasons[f"train:{n + 2}"]  # no excerpt (nor, then, a marker to read)
    assert not {f"train:{i}" for i in range(len(train) + 1, n + 1)} & set(outcome.reasons)  # the RAFT rows pass
    assert outcome.train[-len(rows):] == rows


def test_reading_papers_are_declined_closed_book_and_answered_only_from_their_excerpt():
    from qrb.schema import ABSTAIN_ANSWER
    from stages.generate.raft import READ_WORDINGS, reading_rows

    papers = fake_papers()[:14]
    held = {papers[3]["doi"]}
    train, _ = facts_of(papers, held)
    seen = [{**r, "question": "reworded " + r["question"]} for r in train if r["variant"] == 0 and r["kind"] == "fact"]
    out, seen_out, counts = reading_rows(train, seen, held, papers, 0.25, 2, 120, seed=5)
    assert (out, seen_out, counts) == reading_rows(train, seen, held, papers, 0.25, 2, 120, seed=5)
    read = {r["doi"] for r in out if r["kind"] == "raft"}
    # per paper: its 3 closed-book rows declined, 2 abstract-fact wordings over its excerpt, 1 over distractors only
    assert READ_WORDINGS >= 2 and counts == {"reading_papers": 3, "reading_rows": 3 * (3 + 2 + 1)} and len(read) == 3
    assert not read & held
    closed = [r for r in out if r["doi"] in read and r["kind"] != "raft"]
    assert sorted(r["question"] for r in closed) == sorted(r["question"] for r in train if r["doi"] in read)
    assert all(r["kind"] == "abstain" and r["answer"] == ABSTAIN_ANSWER and not r["short_answer"] for r in closed)
    assert not any(r["doi"] in read for r in seen_out) and len(seen_out) == len(seen) - 2 * 3  # 2 facts a paper
    variants = [(r["fact_id"], r["variant"]) for r in out if r["kind"] == "raft"]
    assert len(variants) == len(set(variants))  # every row of a fact its own variant
    by_title = {pp["title"]: pp["doi"] for pp in papers}
    for r in (r for r in out if r["kind"] == "raft"):
        shown = [by_title[t] for t in shown_titles(r["question"])]
        assert not set(shown) & held
        if r["doi"] in shown:  # its excerpt is shown: the answer cites it
            assert cite(r["answer"], [Passage(d, "", "") for d in shown])[1][0]["doi"] == r["doi"]
        else:  # only other papers: it declines, citing none
            assert r["answer"] == ABSTAIN_ANSWER
    assert [r for r in out if r["doi"] not in read] == [r for r in train if r["doi"] not in read]


def test_reading_practice_asks_more_facts_and_trains_them_only_over_their_papers_excerpt(tmp_path, monkeypatch):
    """`raft_read_facts`: each request asks for that many facts more; those of training papers become RAFT gold rows
    (their paper's excerpt shown, cited), one wording each and never closed-book; an eval paper's are dropped; the
    facts learnt closed-book, the eval split and the seen set are what they were without it."""
    common = dict(prompts=["facts"], pairs_per_prompt=1, eval_size=4, augment_variants=2, seen_questions=10)
    with serve_smoke_endpoint(port=0) as ep:
        plain = make_workspace(tmp_path / "plain", ep.base_url, **common)
        run_main(plain, monkeypatch)
        ws = make_workspace(tmp_path / "ws", ep.base_url, raft_read_facts=2, **common)
        run_main(ws, monkeypatch)
    units, _ = build_units(read(ws / "artifacts/scrape/papers.jsonl")[:1], {"facts": "{{n}} pairs"}, "", params_of(ws), 0)
    assert units[0].messages[1]["content"] == "3 pairs"  # 1 to learn closed-book, 2 to read
    paper = {**read(ws / "artifacts/scrape/papers.jsonl")[0], "full_text": "A body paragraph. " * 400}
    asked = [u.messages[1]["content"] for u in build_units([paper], {"facts": "{{n}} pairs"}, "", params_of(ws), 0)[0]]
    assert asked[0] == "3 pairs" and len(asked) > 1 and set(asked[1:]) == {"1 pairs"}  # practice reads abstracts only
    train, before = read(ws / "artifacts/generate/train.jsonl"), read(plain / "artifacts/generate/train.jsonl")
    practice = [r for r in train if r["kind"] == "raft"]
    same = ("question", "answer", "fact_id", "variant", "kind")
    assert [{k: r[k] for k in same} for r in train if r["kind"] != "raft"] == [{k: r[k] for k in same} for r in before]
    for name in ("eval", "seen"):
        assert [r["question"] for r in read(ws / f"artifacts/generate/{name}.jsonl")] == \
            [r["question"] for r in read(plain / f"artifacts/generate/{name}.jsonl")]
    evals = {r["doi"] for r in read(ws / "artifacts/generate/eval.jsonl")}
    closed = {r["fact_id"] for r in train if r["kind"] != "raft"}
    papers = {pp["doi"]: pp for pp in read(ws / "artifacts/scrape/papers.jsonl")}
    assert len(practice) > len({r["doi"] for r in practice}) and not {r["doi"] for r in practice} & evals
    assert len({r["fact_id"] for r in practice}) == len(practice) and not {r["fact_id"] for r in practice} & closed
    doi_of = {" ".join(pp["title"].split()): doi for doi, pp in papers.items()}
    for r in practice:
        shown = [Passage(doi_of[x.title], x.title, x.text) for x in excerpts(r["question"])]
        own = next(x for x in shown if x.doi == r["doi"])  # its paper's excerpt is shown (tiny: top_k 2) ...
        assert r["short_answer"].lower() in own.text.lower()  # ... and states it ...
        assert [c["doi"] for c in cite(r["answer"], shown)[1]] == [r["doi"]]  # ... and the answer cites it alone
    metrics = json.loads((ws / "reports/generate.json").read_text())
    assert metrics["raft_practice_rows"] == len(practice) and metrics["train_pairs"] == len(train)
