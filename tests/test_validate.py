"""The validate stage: a catalogue of bad rows caught with the right reason, clean data passed untouched, the
dataset-level gate, and the stage run as a subprocess (exit code, summary, outputs, Data Docs).

Clean pairs are built from the real abstracts in data/corpus (one pair per abstract sentence, questions naming
the paper), in the shape the generate stage writes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_validate, validate_workspace
from qrb.schema import PAIR_FIELDS
from stages.validate import ValidateParams
from stages.validate.core import summary, validate
from stages.validate.suite import ROW_SUITE, row_checks

REPO = Path(__file__).resolve().parent.parent
CORPUS = (REPO / "data" / "corpus" / "quantum-papers.jsonl", REPO / "data" / "corpus" / "quantum-papers-arxiv.jsonl")
FIXTURES = REPO / "tests" / "fixtures" / "validate"

P = ValidateParams(min_question_chars=15, max_question_chars=400, min_answer_chars=10, max_answer_chars=2000,
                   min_rows=50, max_fail_rate=0.2, max_paper_share=0.2, min_grounding=0.5, min_similarity=0.0,
                   min_eval_rows=10, max_eval_fraction=0.3)

PDE = "10.22331/q-2021-11-10-574"            # High-precision quantum algorithms for partial differential equations
TENSORKROWCH = "10.22331/q-2024-06-11-1364"
OPTIONS = "10.22331/q-2024-10-23-1504"        # Option pricing under stochastic volatility on a quantum computer


# ---------------------------------------------------------------------------------------------------------------
# Realistic clean pairs from the corpus

def load_papers() -> list[dict]:
    papers: dict[str, dict] = {}
    for path in CORPUS:
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("doi") and rec.get("abstract"):
                papers.setdefault(rec["doi"], rec)
    return sorted(papers.values(), key=lambda r: r["doi"])


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\[\"'$\\])")
_PHRASE_STOP = {"this", "that", "these", "those", "their", "there", "which", "where", "while", "with", "from", "into",
                "have", "been", "also", "such", "show", "shows", "paper", "work", "here", "both", "than", "more",
                "most", "only", "when", "they", "them", "what", "whose", "over", "able", "using"}
TEMPLATES = ('What does the paper "{t}" report about {k}?',
             'According to "{t}", what is known about {k}?',
             'In the Quantum paper "{t}", what is said regarding {k}?')
PROMPTS = ("factual", "results", "methods")


def sentences(abstract: str) -> list[str]:
    return [s for s in _SENT.split(" ".join(abstract.split())) if 25 <= len(s) <= 1500]


def key_phrase(sentence: str, used: set[str]) -> str:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z\-]{3,}", re.sub(r"\$[^$]*\$", " ", sentence))
             if w.lower() not in _PHRASE_STOP]
    for i in range(max(1, len(words) - 2)):
        k = " ".join(words[i:i + 3])
        if k and k not in used:
            used.add(k)
            return k
    k = f"{' '.join(words[:3])} ({len(used)})"
    used.add(k)
    return k


def fact_id(doi: str, question: str) -> str:
    """As generate names a fact: the first 16 hex of sha256(doi + its variant-0 question)."""
    return hashlib.sha256((doi + question).encode("utf-8")).hexdigest()[:16]


def clean_pairs(papers: list[dict]) -> list[dict]:
    """One pair per abstract sentence: the answer is the sentence, the question names the title and a phrase."""
    out = []
    for paper in papers:
        used: set[str] = set()
        title = " ".join(paper["title"].split())
        for i, s in enumerate(sentences(paper["abstract"])):
            q = TEMPLATES[i % 3].format(t=title, k=key_phrase(s, used))
            out.append({"question": q, "answer": s, "doi": paper["doi"], "title": title,
                        "published": paper["published"], "prompt_id": PROMPTS[i % 3], "model": "qrb-test-fixture",
                        "response_id": f"fx-{paper['doi']}-{i}", "chunk": 0, "fact_id": fact_id(paper["doi"], q),
                        "variant": 0})
    return out


@pytest.fixture(scope="module")
def papers() -> list[dict]:
    return load_papers()


@pytest.fixture(scope="module")
def splits(papers) -> tuple[list[dict], list[dict]]:
    """(train, eval), split by paper: the last five papers (by DOI) are eval."""
    pairs = clean_pairs(papers)
    eval_dois = {p["doi"] for p in papers[-5:]}
    return [r for r in pairs if r["doi"] not in eval_dois], [r for r in pairs if r["doi"] in eval_dois]


def by_doi(rows: list[dict], doi: str, n: int = 0) -> dict:
    """A copy of the n-th row of paper `doi` (cycling through its rows)."""
    mine = [r for r in rows if r["doi"] == doi]
    return copy.deepcopy(mine[n % len(mine)])


def title_of(papers: list[dict], doi: str) -> str:
    return " ".join(next(p for p in papers if p["doi"] == doi)["title"].split())


# ---------------------------------------------------------------------------------------------------------------
# The catalogue of bad rows: (id, builder(train, papers) -> row, reasons it must get exactly (or at least, "⊇"))

def _fresh(train: list[dict], doi: str, n: int, tag: str) -> dict:
    """A clean row of paper `doi` with a question no other row has."""
    row = by_doi(train, doi, n)
    row["question"] = f'Which statement ({tag}) does the paper "{row["title"]}" make about its main result?'
    row["response_id"] = f"bad-{tag}"
    row["fact_id"] = fact_id(row["doi"], row["question"])
    return row


def _with(paper: str, n: int, tag: str, /, **changes):
    def build(train, papers):
        row = _fresh(train, paper, n, tag)
        for k, val in changes.items():
            row[k] = val(row, papers) if callable(val) else val
        return row
    return build


def _drop(doi: str, n: int, tag: str, field: str):
    def build(train, papers):
        row = _fresh(train, doi, n, tag)
        del row[field]
        return row
    return build


def _dup(exact: bool):
    def build(train, papers):
        first = by_doi(train, OPTIONS, 0)
        row = by_doi(train, OPTIONS, 1)  # another answer of the same paper, the first row's question
        row["question"] = first["question"] if exact else "  " + first["question"].upper().replace("?", " ?")
        row["response_id"] = f"bad-dup-{exact}"
        return row
    return build


def _not_a_dict(train, papers):
    return ["What is a surface code?", "A surface code is a topological code."]


BAD_ROWS = [
    ("missing_field", _drop(PDE, 0, "missing", "published"), {"missing_field"}),
    ("not_an_object", _not_a_dict, "⊇", {"missing_field", "empty_question", "provenance_missing"}),
    ("wrong_type_chunk", _with(PDE, 1, "type1", chunk=1.5), {"wrong_type"}),
    ("wrong_type_published", _with(PDE, 2, "type2", published=20211110), {"wrong_type"}),
    ("empty_question", _with(PDE, 3, "e1", question="   "), {"empty_question", "question_length", "not_a_question"}),
    ("empty_answer", _with(PDE, 4, "e2", answer=""), {"empty_answer", "answer_length", "ungrounded"}),
    ("question_too_short", _with(TENSORKROWCH, 0, "s1", question="What is QSP?"), {"question_length"}),
    ("question_too_long", _with(TENSORKROWCH, 1, "s2", question=lambda r, _: (
        f'What does the paper "{r["title"]}" report about tensor networks, '
        + "and how does this relate to the wider literature on the same topic, " * 6 + "?")), {"question_length"}),
    ("answer_too_long", _with(TENSORKROWCH, 2, "s3", answer=lambda r, ps: " ".join(
        [next(p for p in ps if p["doi"] == r["doi"])["abstract"]] * 3)), {"answer_length"}),
    ("answer_too_short", _with(TENSORKROWCH, 3, "s4", question="On top of which framework is TensorKrowch built?",
                               answer="PyTorch."), {"answer_length"}),
    ("not_a_question", _with(OPTIONS, 2, "nq", question=lambda r, _: f'Summarise what "{r["title"]}" says about '
                             "the Heston model."), {"not_a_question"}),
    ("duplicate_question", _dup(exact=True), {"duplicate_question"}),
    ("near_duplicate_question", _dup(exact=False), {"near_duplicate_question"}),
    ("refusal_as_an_ai", _with(OPTIONS, 3, "r1", answer="As an AI language model, I cannot access the full text of "
                               "this article."), {"refusal_or_boilerplate", "ungrounded"}),
    ("refusal_text_does_not_mention", _with(OPTIONS, 4, "r2", answer="The text does not mention which hardware "
                                            "platform was used."), {"refusal_or_boilerplate", "ungrounded"}),
    ("boilerplate_na", _with(PDE, 5, "r3", answer="N/A"), {"refusal_or_boilerplate", "answer_length", "ungrounded"}),
    ("leaked_prompt_preamble", _with(PDE, 6, "l1", answer=lambda r, _: "Here are the question-answer pairs: "
                                     + r["answer"]), {"leaked_prompt"}),
    ("leaked_paper_delimiter", _with(TENSORKROWCH, 4, "l2", question=lambda r, _: f'<paper> Title: {r["title"]} '
                                     "</paper> What is said about PyTorch?"), {"leaked_prompt"}),
    ("leaked_chat_token", _with(OPTIONS, 0, "l3", answer=lambda r, _: r["answer"] + " <|eot_id|>"),
     {"leaked_prompt"}),
    ("json_fragment", _with(OPTIONS, 1, "j1", answer=lambda r, _: json.dumps({"answer": r["answer"]})),
     {"json_or_markup"}),
    ("html_markup", _with(PDE, 0, "m1", answer=lambda r, _: f"<p>{r['answer']}</p>"), {"json_or_markup"}),
    ("markdown_markup", _with(PDE, 1, "m2", answer=lambda r, _: f"**Answer:** {r['answer']}"), {"json_or_markup"}),
    ("not_english_german", _with(PDE, 2, "g1", question=lambda r, _: f'Was berichtet der Artikel "{r["title"]}" '
                                 "über die Methode?", answer="Die Autoren entwickeln einen neuen Algorithmus, der "
                                 "die Komplexität für lineare Gleichungen deutlich verbessert."),
     {"not_english", "ungrounded"}),
    ("not_english_script", _with(PDE, 3, "g2", answer="该论文提出了一种新的量子算法，用于求解偏微分方程。"),
     {"not_english", "ungrounded"}),
    ("doi_as_url", _with(PDE, 4, "d1", doi=lambda r, _: "https://doi.org/" + r["doi"]),
     {"doi_format", "unknown_paper", "ungrounded"}),
    ("provenance_missing", _with(PDE, 5, "p1", response_id=""), {"provenance_missing"}),
    ("unknown_paper", _with(PDE, 6, "p2", doi="10.22331/q-2099-01-01-9999"), {"unknown_paper", "ungrounded"}),
    ("title_mismatch", _with(PDE, 0, "p3", title=lambda r, ps: title_of(ps, TENSORKROWCH)), {"title_mismatch"}),
    ("ungrounded_hallucination", _with(PDE, 1, "u1", answer="The authors demonstrate the protocol on a 127-qubit IBM "
                                       "superconducting processor with a two-qubit gate fidelity of 99.9%."),
     {"ungrounded"}),
    ("ungrounded_other_papers_answer", _with(TENSORKROWCH, 0, "u2", answer=lambda r, ps: sentences(
        next(p for p in ps if p["doi"] == OPTIONS)["abstract"])[1]), {"ungrounded"}),
    ("unnamed_this_paper", _with(OPTIONS, 2, "n1", question="What does this paper conclude about the weak Euler "
                                 "method?"), {"unnamed_reference"}),
    ("unnamed_the_authors", _with(OPTIONS, 3, "n2", question="What do the authors find about the Heston model?"),
     {"unnamed_reference"}),
    ("answer_repeats_question", _with(OPTIONS, 4, "a1", answer=lambda r, _: r["question"]),
     {"answer_repeats_question"}),
]

# rows that look suspicious to a naive filter but are fine
NEAR_MISSES = [
    ("names_the_paper_and_its_authors", _with(OPTIONS, 0, "ok1", question=lambda r, _: f'In the paper "{r["title"]}",'
                                              " what do the authors show about the weak Euler method?")),
    ("the_study_of", _with(PDE, 2, "ok2", question=lambda r, _: f'What does "{r["title"]}" contribute to the study '
                           "of partial differential equations?")),
    ("maths_inequalities", _with(PDE, 3, "ok3", answer="The complexity is $\\mathrm{poly}(d, \\log(1/\\epsilon))$ "
                                 "where $d<a$ and $b>d$ for the spatial dimension $d$.")),
    ("paraphrased_short_answer", _with(TENSORKROWCH, 1, "ok4", answer="It is built on top of PyTorch.")),
    ("unicode_greek", _with(PDE, 4, "ok5", answer="The complexity is poly(d, log(1/ε)), where ε is the error "
                            "tolerance.")),
]


@pytest.fixture(scope="module")
def catalogue(splits, papers):
    train, eval_ = splits
    bad = [build(train, papers) for _, build, *_ in BAD_ROWS]
    ok = [build(train, papers) for _, build in NEAR_MISSES]
    train_in = train + bad + ok
    outcome = validate(train_in, eval_, papers, P)
    first_bad = len(train) + 1
    rows = {case[0]: f"train:{first_bad + i}" for i, case in enumerate(BAD_ROWS)}
    rows.update({case[0]: f"train:{first_bad + len(bad) + i}" for i, case in enumerate(NEAR_MISSES)})
    return outcome, rows, train, eval_


@pytest.mark.parametrize("case", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_row_is_quarantined_with_the_right_reasons(catalogue, case):
    outcome, rows, *_ = catalogue
    name, expected = case[0], case[-1]
    reasons = outcome.reasons.get(rows[name])
    assert reasons is not None, f"{name} passed validation"
    if case[2] == "⊇":
        assert expected <= set(reasons), reasons
    else:
        assert set(reasons) == expected
    q = next(q for q in outcome.quarantine if q["row_id"] == rows[name])
    assert q["reasons"] == reasons and q["split"] == "train" and "grounding" in q["scores"]


@pytest.mark.parametrize("name", [c[0] for c in NEAR_MISSES])
def test_near_misses_pass(catalogue, name):
    outcome, rows, *_ = catalogue
    assert rows[name] not in outcome.reasons, outcome.reasons.get(rows[name])


def test_catalogue_covers_at_least_twelve_reasons():
    kinds = {r for case in BAD_ROWS for r in case[-1]}
    assert len(BAD_ROWS) >= 12 and len(kinds) >= 12


def test_under_the_threshold_the_gate_passes_and_only_bad_rows_are_quarantined(catalogue):
    outcome, rows, train, eval_ = catalogue
    assert outcome.gate_passed
    assert {q["row_id"] for q in outcome.quarantine} == {rows[c[0]] for c in BAD_ROWS}
    assert outcome.train[:len(train)] == train and outcome.eval == eval_
    m = outcome.metrics
    assert m["rows_in"]["total"] == len(train) + len(eval_) + len(BAD_ROWS) + len(NEAR_MISSES)
    assert m["rows_quarantined"] == len(BAD_ROWS)
    assert m["rows_out"]["total"] == m["rows_in"]["total"] - len(BAD_ROWS)
    for reason, n in m["row_failures"].items():                             # metrics agree with the quarantine
        assert n == sum(reason in q["reasons"] for q in outcome.quarantine), reason
    assert set(m["row_failures"]) == {c.reason for c in row_checks(P)}


def test_clean_dataset_passes_untouched(splits, papers):
    train, eval_ = splits
    snapshot = copy.deepcopy((train, eval_))
    outcome = validate(train, eval_, papers, P)
    assert outcome.gate_passed and outcome.quarantine == []
    assert outcome.train == snapshot[0] and outcome.eval == snapshot[1]       # same rows, same order
    assert (train, eval_) == snapshot                                        # inputs not modified
    assert all(c.success for c in outcome.row_results + outcome.dataset_results)
    assert outcome.metrics["grounding_mean"] == 1.0


def test_smoke_endpoint_pairs_from_the_whole_corpus_pass(papers):
    """What the offline demo feeds the stage: every pair the extractive smoke endpoint writes must pass."""
    from standins.smoke import extractive_pairs

    pairs = []
    for p in papers:
        for prompt in ("factual", "results", "methods", "novelty", "definitions"):
            for qa in extractive_pairs(p["title"], p["abstract"], prompt, 3):
                pairs.append({**qa, "doi": p["doi"], "title": " ".join(p["title"].split()),
                              "published": p["published"], "prompt_id": prompt, "model": "qrb-smoke-extractive",
                              "response_id": f"chatcmpl-smoke-{p['doi']}-{prompt}", "chunk": 0,
                              "fact_id": fact_id(p["doi"], qa["question"]), "variant": 0})
    eval_dois = {p["doi"] for p in papers[-4:]}
    outcome = validate([r for r in pairs if r["doi"] not in eval_dois], [r for r in pairs if r["doi"] in eval_dois],
                       papers, P)
    assert outcome.quarantine == [], summary(outcome)
    assert outcome.gate_passed


def test_hand_paraphrased_pairs_pass_by_token_overlap(papers):
    rows = [json.loads(line) for line in (FIXTURES / "paraphrased_pairs.jsonl").read_text().splitlines()]
    outcome = validate(rows, [], papers, dataclasses.replace(P, min_rows=1, min_eval_rows=0))
    assert outcome.quarantine == [], outcome.quarantine


# ---------------------------------------------------------------------------------------------------------------
# Dataset-level expectations (the gate)

def failed_checks(outcome) -> set[str]:
    return {c.reason for c in outcome.dataset_results if not c.success}


def test_fail_rate_above_threshold_closes_the_gate(splits, papers):
    train, eval_ = splits
    bad = []
    for i, row in enumerate(copy.deepcopy(train[: len(train) // 3])):
        row["question"] = f"Question number {i} about nothing in particular?"
        row["answer"] = "I'm sorry, but I cannot answer that question."
        bad.append(row)
    outcome = validate(train + bad, eval_, papers, P)
    assert not outcome.gate_passed and failed_checks(outcome) == {"max_fail_rate"}
    text = summary(outcome)
    assert "gate FAILED" in text and "max_fail_rate" in text
    assert re.search(rf"refusal_or_boilerplate\s+{len(bad)}\b", text)
    assert "I'm sorry" in text                                               # an example row is shown


def test_min_rows_and_eval_size(splits, papers):
    train, eval_ = splits
    o = validate(train, eval_, papers, dataclasses.replace(P, min_rows=len(train) + 1))
    assert failed_checks(o) == {"min_rows"}
    o = validate(train, eval_, papers, dataclasses.replace(P, min_eval_rows=len(eval_) + 1))
    assert failed_checks(o) == {"min_eval_rows"}
    o = validate(train, eval_, papers, dataclasses.replace(P, max_eval_fraction=0.01))
    assert failed_checks(o) == {"max_eval_fraction"}
    assert o.metrics["dataset_checks"]["max_eval_fraction"]["observed"] == pytest.approx(
        len(eval_) / (len(train) + len(eval_)), abs=1e-6)


def test_one_paper_dominating_train_closes_the_gate(splits, papers):
    train, eval_ = splits
    extra = []
    for i in range(120):  # many more (distinct, valid) pairs of one paper
        row = by_doi(train, PDE, i % 5)
        row["question"] = f'What does the paper "{row["title"]}" state in variant {i} of its claims?'
        row["fact_id"] = fact_id(row["doi"], row["question"])                 # a new fact each
        extra.append(row)
    outcome = validate(train + extra, eval_, papers, P)
    assert failed_checks(outcome) == {"max_paper_share"}
    assert PDE in summary(outcome)


def test_a_paper_in_both_splits_closes_the_gate(splits, papers):
    train, eval_ = splits
    leaked = by_doi(train, OPTIONS, 0)
    leaked["question"] = f'Which result of "{leaked["title"]}" concerns the Heston model?'
    outcome = validate(train, eval_ + [leaked], papers, P)
    assert failed_checks(outcome) == {"split_disjoint"}
    assert OPTIONS in summary(outcome)


def test_no_rows_at_all_fails_cleanly(papers):
    outcome = validate([], [], papers, P)
    assert not outcome.gate_passed and {"min_rows", "min_eval_rows"} <= failed_checks(outcome)
    assert outcome.metrics["rows_in"]["total"] == 0


def test_params_check_names_the_key():
    with pytest.raises(ValueError, match=r"validate\.max_question_chars"):
        dataclasses.replace(P, max_question_chars=5).check()
    with pytest.raises(ValueError, match=r"validate\.max_fail_rate"):
        dataclasses.replace(P, max_fail_rate=1.5).check()


def test_module_import_is_light():
    code = ("import sys, stages.validate; heavy = [m for m in ('great_expectations', 'datasets', 'torch', "
            "'sentence_transformers', 'pandas') if m in sys.modules]; print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True)


# ---------------------------------------------------------------------------------------------------------------
# The stage as a subprocess in a workspace

def make_workspace(root: Path, papers: list[dict], train: list, eval_: list, seen: list = (), **overrides) -> Path:
    return validate_workspace(root, {**dataclasses.asdict(P), **overrides}, papers, train, eval_, seen)


run_stage = run_validate


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_stage_under_threshold_passes_quarantines_and_writes_every_output(tmp_path, splits, papers):
    train, eval_ = splits
    bad = [build(train, papers) for name, build, *_ in BAD_ROWS
           if name in ("refusal_as_an_ai", "leaked_chat_token", "unnamed_this_paper", "doi_as_url")]
    ws = make_workspace(tmp_path, papers, train[:40] + bad + train[40:], eval_)
    r = run_stage(ws)
    assert r.returncode == 0, r.stderr
    assert "gate PASSED" in r.stderr
    out = ws / "artifacts/validate"
    assert read_jsonl(out / "train.jsonl") == train and read_jsonl(out / "eval.jsonl") == eval_
    assert [m["messages"][2]["content"] for m in read_jsonl(out / "openai/eval.jsonl")] == [r["answer"] for r in eval_]
    quarantine = read_jsonl(out / "quarantine.jsonl")
    assert [q["line"] for q in quarantine] == [41, 42, 43, 44] and [q["row"] for q in quarantine] == bad
    assert quarantine[0]["reasons"] == ["refusal_or_boilerplate", "ungrounded"]

    import datasets

    dd = datasets.load_from_disk(str(out / "dataset"))
    assert set(dd) == {"train", "eval"} and dd["train"].num_rows == len(train) and dd["eval"].num_rows == len(eval_)
    assert dd["train"].column_names == list(PAIR_FIELDS)
    # rows written before the key-fact fields existed get their defaults
    defaults = {"short_answer": "", "aliases": [], "evidence": "", "kind": "fact"}
    assert dd["train"][0] == {**defaults, **train[0]} and dd["eval"][len(eval_) - 1] == {**defaults, **eval_[-1]}

    m = json.loads((ws / "reports/validate.json").read_text())
    assert m["gate_passed"] is True and m["rows_in"]["total"] == len(train) + len(eval_) + 4
    assert m["rows_out"] == {"train": len(train), "eval": len(eval_), "total": len(train) + len(eval_)}
    assert m["row_failures"]["leaked_prompt"] == 1 and m["row_failures"]["unnamed_reference"] == 1

    index = (ws / "reports/data_docs/index.html").read_text()
    assert "Gate PASSED" in index
    failed = re.search(r"<h2>Failed expectations</h2>\s*<ul>(.*?)</ul>", index, re.S).group(1)
    for reason in ("refusal_or_boilerplate", "leaked_prompt", "unnamed_reference", "doi_format", "unknown_paper"):
        assert f"<code>{reason}</code>" in failed
    assert "<code>not_english</code>" not in failed
    gx_pages = list((ws / "reports/data_docs/validations").rglob("*.html"))
    assert len(gx_pages) == 3 and (ws / "reports/data_docs/gx_index.html").exists()    # rows, seen, dataset
    row_page = next(pg for pg in gx_pages if ROW_SUITE in str(pg)).read_text()
    assert "no prompt, template or chat-format fragments" in row_page and "train:43" in row_page
    assert not list(ws.glob("reports/.*")) and not list(out.glob(".*"))     # no temp folders left


def test_stage_over_threshold_fails_with_a_readable_summary(tmp_path, splits, papers):
    train, eval_ = splits
    bad = []
    for i, row in enumerate(copy.deepcopy(train[:80])):
        row["answer"] = "As an AI, I cannot answer questions about this paper."
        bad.append(row)
        row["question"] = f"What does this paper say about topic {i}?"
    ws = make_workspace(tmp_path, papers, train + bad, eval_)
    r = run_stage(ws)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "gate FAILED" in r.stderr and "max_fail_rate: observed" in r.stderr
    assert re.search(r"refusal_or_boilerplate\s+80", r.stderr) and re.search(r"unnamed_reference\s+80", r.stderr)
    assert "As an AI" in r.stderr                                              # examples
    out = ws / "artifacts/validate"
    assert not (out / "dataset").exists() and not (out / "train.jsonl").exists()  # nothing for train to read
    assert len(read_jsonl(out / "quarantine.jsonl")) == 80
    m = json.loads((ws / "reports/validate.json").read_text())
    assert m["gate_passed"] is False and m["dataset_checks"]["max_fail_rate"]["success"] is False
    index = (ws / "reports/data_docs/index.html").read_text()
    assert "Gate FAILED" in index and "<code>max_fail_rate</code>" in index


def test_stage_passes_a_clean_dataset_byte_for_byte(tmp_path, splits, papers):
    train, eval_ = splits
    ws = make_workspace(tmp_path, papers, train, eval_)
    r = run_stage(ws)
    assert r.returncode == 0, r.stderr
    for split in ("train", "eval"):
        assert ((ws / f"artifacts/validate/{split}.jsonl").read_bytes()
                == (ws / f"artifacts/generate/{split}.jsonl").read_bytes())
    assert (ws / "artifacts/validate/quarantine.jsonl").read_text() == ""


def test_stage_bad_input_is_a_one_line_error(tmp_path, splits, papers):
    train, eval_ = splits
    ws = make_workspace(tmp_path, papers, train, eval_)
    (ws / "artifacts/generate/eval.jsonl").unlink()
    r = run_stage(ws)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "validate: artifacts/generate/eval.jsonl not found" in r.stderr
    (ws / "artifacts/generate/eval.jsonl").write_text(json.dumps(eval_[0]) + "\n{not json\n")
    r = run_stage(ws)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "validate: artifacts/generate/eval.jsonl:2: not valid JSON" in r.stderr
    assert not (ws / "artifacts/validate").exists()
    ws2 = make_workspace(tmp_path / "ws2", papers, train, eval_, max_answer_chars=5)
    r = run_stage(ws2)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "validate.max_answer_chars" in r.stderr
    assert not (ws2 / "artifacts/validate").exists()


def test_stage_with_an_empty_eval_split_writes_a_dataset_that_loads_back(tmp_path, splits, papers):
    """`min_eval_rows: 0` and no eval pairs used to pass the gate, then crash with IndexError at the split."""
    train, _ = splits
    ws = make_workspace(tmp_path, papers, train, [], min_eval_rows=0)
    r = run_stage(ws)
    assert r.returncode == 0, r.stderr
    assert "gate PASSED" in r.stderr and "Traceback" not in r.stderr
    import datasets

    dd = datasets.load_from_disk(str(ws / "artifacts/validate/dataset"))
    assert (dd["train"].num_rows, dd["eval"].num_rows) == (len(train), 0)
    assert dd["eval"].features == dd["train"].features
    assert (ws / "artifacts/validate/eval.jsonl").read_text() == ""
    assert json.loads((ws / "reports/validate.json").read_text())["rows_out"]["eval"] == 0


def test_stage_with_no_rows_at_all_is_a_data_error_with_a_summary(tmp_path, papers):
    """Nothing to train on is never a passing gate: `min_rows` is at least 1 (0 is a params error)."""
    ws = make_workspace(tmp_path, papers, [], [], min_rows=1, min_eval_rows=0)
    r = run_stage(ws)
    assert r.returncode == 65 and "Traceback" not in r.stderr
    assert "gate FAILED" in r.stderr and "min_rows: observed 0" in r.stderr
    assert not (ws / "artifacts/validate/dataset").exists()
    ws0 = make_workspace(tmp_path / "ws0", papers, [], [], min_rows=0, min_eval_rows=0)
    r = run_stage(ws0)
    assert r.returncode == 78 and "validate.min_rows" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# MiniLM similarity (loads the model: slow)

@pytest.mark.slow
def test_minilm_similarity_passes_paraphrases_and_flags_off_topic_answers(papers):
    rows = [json.loads(line) for line in (FIXTURES / "paraphrased_pairs.jsonl").read_text().splitlines()]
    off = dict(rows[0], question="What does the TensorKrowch paper say about the stock market?",
               answer="The stock market tends to rise in December according to historical data.",
               response_id="off-topic")
    p = dataclasses.replace(P, min_similarity=0.3, min_rows=1, min_eval_rows=0)
    outcome = validate(rows + [off], [], papers, p)
    assert outcome.reasons == {f"train:{len(rows) + 1}": ["ungrounded", "off_topic"]}
    assert outcome.metrics["row_failures"]["off_topic"] == 1
