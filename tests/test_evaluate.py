"""Evaluate stage: metrics equal their reference libraries, intervals, freshness, rivals, RAG, the LLM grader (a fake
server and the smoke endpoint), the whole stage."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qrb.llm import Cache
from qrb.model import Gate
from qrb.params import load_params
from qrb.retrieval import PACKAGED_MINILM, RetrievalParams, Retriever, passages_from_papers
from qrb.rivals import Rival, ask_rival
from qrb.schema import ABSTAIN_ANSWER, question_record
from stages.evaluate import EvaluateParams, Grader
from stages.evaluate.core import freshness_subsets
from stages.evaluate.judge import SYSTEM as GRADER_SYSTEM
from stages.evaluate.judge import Item, llm_grades, parse_grade
from stages.evaluate.metrics import (
    MEAN_METRICS,
    OFFLINE_BERTSCORE,
    Scorer,
    aggregate,
    bertscore_model_path,
    bootstrap_indices,
    paired_gains,
)
from stages.evaluate.report import HEADLINE_METRICS, PLOT_METRICS, RAG_HEADLINE
from stages.evaluate.run import main as run_evaluate_stage

REPO = Path(__file__).resolve().parent.parent
SYSTEM = "You answer questions about quantum research."

PREDS = ["The qubit decoheres within microseconds under thermal noise.",
         "Surface codes reach a threshold near one percent.",
         "TensorKrowch is built on PyTorch.",
         "We propose a variational algorithm for ground states.",
         "No idea.",
         "Entanglement witnesses detect bound entanglement in four qubits."]
REFS = ["Thermal noise makes the qubit decohere within a few microseconds.",
        "The surface code threshold is about one percent.",
        "TensorKrowch is built on top of the PyTorch framework.",
        "The paper proposes a variational quantum algorithm to find ground states.",
        "The error rate was reduced by 67% using two copies.",
        "Bound entanglement in four-qubit states is detected with entanglement witnesses."]


@pytest.fixture(scope="module")
def scorer():
    return Scorer(OFFLINE_BERTSCORE, 6)


def params(**overrides) -> EvaluateParams:
    _, p = load_params("evaluate", EvaluateParams, (), REPO / "params.yaml")
    return dataclasses.replace(p, **overrides)


# ---------------------------------------------------------------------------------------------------------------
# Metrics = the reference libraries' own output

def test_each_metric_equals_its_reference_library(scorer):
    import bert_score
    import sacrebleu
    from rouge_score import rouge_scorer

    rows = scorer.rows(PREDS, REFS)
    m = aggregate(rows, seed=1, samples=300)
    ref_rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = [ref_rouge.score(r, p)[key].fmeasure for p, r in zip(PREDS, REFS)]
        assert [row[key] for row in rows] == pytest.approx(expected, abs=1e-12)
        assert m[key] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-9)
    assert m["bleu"] != pytest.approx(sum(sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)) / 6)
    P, R, F = bert_score.score(PREDS, REFS, model_type=bertscore_model_path(OFFLINE_BERTSCORE), num_layers=6)
    for key, t in (("bertscore_p", P), ("bertscore_r", R), ("bertscore_f1", F)):
        assert [row[key] for row in rows] == pytest.approx(t.tolist(), abs=1e-5)
        assert m[key] == pytest.approx(t.mean().item(), abs=1e-5)
    assert m["answer_words"] == pytest.approx(sum(len(p.split()) for p in PREDS) / 6)
    assert m["n"] == 6


def test_every_metric_has_a_95_interval_and_bleu_resamples_are_sacrebleus(scorer):
    import sacrebleu

    rows = scorer.rows(PREDS, REFS)
    for r, nll in zip(rows, [3.0, 1.0, 2.0, 5.0, 9.0, 4.0]):
        r.update(nll=nll, answer_tokens=2 + int(nll))
    m = aggregate(rows, seed=3, samples=400)
    for key in (*MEAN_METRICS, "bleu", "cross_entropy"):
        lo, hi = m[f"{key}_ci95"]
        assert lo <= m[key] <= hi and lo < hi, key
    assert m["cross_entropy"] == pytest.approx(24.0 / 36.0)
    # a resample's BLEU from summed statistics is sacrebleu's corpus BLEU of the resampled texts
    from sacrebleu.metrics import BLEU

    idx = bootstrap_indices(6, 5, seed=3)
    for sample in idx:
        stats = [sum(rows[i]["bleu_stats"][k] for i in sample) for k in range(len(rows[0]["bleu_stats"]))]
        expected = sacrebleu.corpus_bleu([PREDS[i] for i in sample], [[REFS[i] for i in sample]]).score
        assert BLEU()._compute_score_from_stats(stats).score == pytest.approx(expected, abs=1e-9)
    # same seed and n: the same resamples (paired across models), deterministic intervals
    assert aggregate(rows, seed=3, samples=400) == m
    assert (bootstrap_indices(6, 5, seed=3) == idx).all()


def test_no_cross_entropy_when_a_prompt_leaves_its_answer_no_tokens(scorer):
    """A RAG prompt longer than base.max_length is cut before its answer (0 answer tokens): its CE read 0.000 on the
    smol demo. No CE is reported then, rather than one over the other rows or a zero."""
    rows = scorer.rows(PREDS, REFS)
    for r, nll in zip(rows, [3.0, 1.0, 2.0, 5.0, 9.0, 4.0]):
        r.update(nll=nll, answer_tokens=2)
    assert "cross_entropy" in aggregate(rows, seed=3, samples=200)
    rows[2].update(nll=0.0, answer_tokens=0)
    m = aggregate(rows, seed=3, samples=200)
    assert "cross_entropy" not in m and "cross_entropy_ci95" not in m


def graded_rows(grades: list[str]) -> list[dict]:
    """Scorer-shaped rows (the fields aggregate reads) with the given grades ("no_gold:<grade>": a fact row without
    its short answer)."""
    from stages.evaluate.core import grade_columns

    style = {"rouge1": 0.3, "rouge2": 0.1, "rougeL": 0.2, "bertscore_p": 0.8, "bertscore_r": 0.8, "bertscore_f1": 0.8,
             "sentence_bleu": 5.0, "answer_words": 10.0, "bleu_stats": [3, 1, 0, 0, 6, 4, 3, 2, 5, 5]}
    return [{**style, **grade_columns({"short_answer": "" if g.startswith("no_gold") else "56 qubits"},
                                      g.removeprefix("no_gold:"))} for g in grades]


def test_grade_rates_hallucination_and_paired_gains_use_the_same_resamples():
    import numpy as np

    rng = np.random.default_rng(0)
    kinds = ["correct", "incorrect", "not_attempted"]
    base_g = [str(g) for g in rng.choice(kinds, 30, p=[0.1, 0.6, 0.3])]
    model_g = [str(g) for g in rng.choice(kinds, 30, p=[0.7, 0.1, 0.2])]
    base_g[3], model_g[3] = "no_gold:incorrect", "no_gold:not_attempted"  # no gold: only attempted or not
    base, model = graded_rows(base_g), graded_rows(model_g)
    mb, mm = aggregate(base, seed=7, samples=500), aggregate(model, seed=7, samples=500)
    assert mb["graded_n"] == mm["graded_n"] == 29 and mb["n"] == 30 and model[3]["grade"] == "not_attempted"
    graded = [g for i, g in enumerate(model_g) if i != 3]
    c, w = graded.count("correct"), graded.count("incorrect")
    assert mm["correct"] == pytest.approx(c / 29) and mm["incorrect"] == pytest.approx(w / 29)
    assert mm["not_attempted"] == pytest.approx((graded.count("not_attempted") + 1) / 30)  # over every question
    assert mm["hallucination_rate"] == pytest.approx(w / (c + w))
    assert base[3]["grade"] == "no_gold" and base[3]["correct"] is None and base[3]["not_attempted"] == 0.0
    gains = paired_gains(model, base, seed=7, samples=500)
    diff = np.array([np.nan if m["correct"] is None else m["correct"] - b["correct"] for m, b in zip(model, base)])
    assert gains["correct_gain"] == pytest.approx(np.nanmean(diff))
    # the interval is over the same resamples as aggregate's (bootstrap_indices for this n and seed)
    idx = bootstrap_indices(30, 500, seed=7)
    assert gains["correct_gain_ci95"] == pytest.approx(list(np.percentile([np.nanmean(diff[i]) for i in idx],
                                                                          [2.5, 97.5])))
    lo, hi = gains["correct_gain_ci95"]
    assert 0 < lo < gains["correct_gain"] < hi  # a consistent gain: its interval excludes zero
    assert gains["not_attempted_gain"] == pytest.approx(mm["not_attempted"] - mb["not_attempted"])
    small = paired_gains(model[:3], base[:3], seed=7, samples=500, min_n=5)
    assert small["correct_gain_ci95"] == "n too small" and "correct_gain" in small
    none = aggregate(graded_rows(["no_gold:incorrect", "no_gold:not_attempted"]), seed=1, samples=200)
    assert none["graded_n"] == 0 and "correct" not in none and none["not_attempted"] == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Freshness

def test_paper_dates_and_freshness_split():
    papers = [{"doi": "10.22331/q-2024-01-05-1", "arxiv": "2305.00001v2", "published": "2024-01-05"}]
    rows = [{"published": "2024-09-02"},                               # eval pairs carry `published`
            {"paper_doi": "10.22331/q-2023-06-11-1364"},              # golden: the DOI's date
            {"paper_arxiv": "2305.00001"},                             # matched to papers.jsonl by arXiv id
            {"paper_arxiv": "2312.01234"},                             # arXiv month: Dec 2023, not after
            {"paper_arxiv": "2401.01234"},
            {"paper_doi": None, "paper_arxiv": None}]                  # undated: in neither split
    rows = [question_record(r) for r in rows]  # as evaluate reads them: golden's paper_* are doi/arxiv
    subsets, dates = freshness_subsets(rows, dt.date(2023, 12, 31), papers)
    # the third: its paper's journal date is 2024-01-05, but its arXiv v1 (2305) made it public in May 2023
    assert dates == [dt.date(2024, 9, 2), dt.date(2023, 6, 11), dt.date(2023, 5, 1), dt.date(2023, 12, 1),
                     dt.date(2024, 1, 1), None]
    assert subsets == {"after_cutoff": [0, 4], "before_cutoff": [1, 2, 3]}


def test_question_sets_a_missing_seen_file_is_an_error_an_empty_one_is_n0(tmp_path, monkeypatch):
    from qrb.errors import ConfigError, DataError
    from stages.evaluate.run import load_question_sets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts/validate").mkdir(parents=True)
    (tmp_path / "golden.jsonl").write_text(json.dumps({"question": "Q?", "answer": "A.", "paper_doi": None}) + "\n")
    (tmp_path / "artifacts/validate/eval.jsonl").write_text(json.dumps({"question": "E?", "answer": "B."}) + "\n")
    with pytest.raises(ConfigError, match=r"'seen' not found at artifacts/validate/seen.jsonl.*dvc repro validate"):
        load_question_sets("golden.jsonl")  # a stale workspace: validate always writes it
    (tmp_path / "artifacts/validate/seen.jsonl").write_text("")
    sets = load_question_sets("golden.jsonl")
    # no invented.jsonl (a workspace from before validate wrote it): an empty set, not an error
    assert list(sets) == ["golden", "seen", "eval", "invented"] and sets["seen"] == sets["invented"] == []
    assert sets["golden"][0]["doi"] is None
    (tmp_path / "artifacts/validate/seen.jsonl").write_text(json.dumps({"question": "S?", "answer": ""}) + "\n")
    with pytest.raises(DataError, match="seen.jsonl:1: each row needs a non-empty question and answer"):
        load_question_sets("golden.jsonl")
    (tmp_path / "golden.jsonl").write_text("")
    with pytest.raises(DataError, match="'golden' at golden.jsonl is empty"):
        load_question_sets("golden.jsonl")


def test_params_reject_bad_rivals_and_small_bootstrap():
    with pytest.raises(ValueError, match="bootstrap_samples"):
        params(bootstrap_samples=10).check()
    r = Rival("gemini.1", "https://x/v1", "m", "K")
    with pytest.raises(ValueError, match="distinct"):
        params(rivals=(r, Rival("gemini_1", "https://y/v1", "m", "K"))).check()
    with pytest.raises(ValueError, match="base_url"):
        params(rivals=(Rival("a", "ftp://x", "m", "K"),)).check()
    with pytest.raises(ValueError, match="min_n_for_interval"):
        params(min_n_for_interval=1).check()
    with pytest.raises(ValueError, match="grader.base_url"):
        params(grader=Grader("localhost:8000", "m", "K")).check()
    from qrb.params import build

    data = {f.name: getattr(params(), f.name) for f in dataclasses.fields(EvaluateParams)}
    data["rivals"] = []
    graded = build(EvaluateParams, {**data, "grader": {"base_url": "http://h/v1", "model": "m",
                                                       "api_key_env": "K"}}, "evaluate")
    assert graded.grader == Grader("http://h/v1", "m", "K") and params().grader is None
    with pytest.raises(ValueError, match=r"`evaluate\.grader` must be a mapping with keys base_url, model, "
                                         r"api_key_env or null"):
        build(EvaluateParams, {**data, "grader": {"base_url": "http://h/v1", "model": "m"}}, "evaluate")
    assert params().rivals[0].key == "rival_gemini-1_5-pro" and params().knowledge_cutoff == dt.date(2023, 12, 31)


# ---------------------------------------------------------------------------------------------------------------
# Rivals against a fake OpenAI-compatible server

class FakeOpenAI:
    """A minimal OpenAI-compatible chat-completions server on 127.0.0.1 (modes per model id)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"auth": self.headers.get("Authorization"), **body})
                if body["model"] == "broken":
                    return self._send(500, {"error": {"message": "upstream exploded", "type": "server_error"}},
                                      {"retry-after-ms": "10"})
                if self.headers.get("Authorization") != "Bearer good-key":
                    return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                q = body["messages"][-1]["content"]
                if body["messages"][0]["content"] == GRADER_SYSTEM:  # the LLM grader
                    answer = fake_grade(q) if body["model"] != "babbler" else "Hard to say, really."
                else:
                    answer = REFS[PREDS.index(q)] if q in PREDS else f"An answer to: {q}"
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, obj, headers=None) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fake_grade(prompt: str) -> str:
    """The fake grader: CORRECT when the answer contains the gold's last word, else INCORRECT (what a test can
    recompute, and unlike the offline grader), after reasoning that names the other grade first."""
    gold = prompt.split("<gold_target>\n")[-1].split("\n</gold_target>")[0]
    answer = prompt.split("<predicted_answer>\n")[-1].split("\n</predicted_answer>")[0]
    g = "CORRECT" if fake_says_correct(gold, answer) else "INCORRECT"
    other = "INCORRECT" if g == "CORRECT" else "CORRECT"
    return f"Is it {other}? The question says so.\n\nFinal grade:\n**{g}**"


def fake_says_correct(gold: str, answer: str) -> bool:
    return gold.split()[-1].strip(".,;:!?").lower() in answer.lower()


@pytest.fixture()
def fake_openai():
    fake = FakeOpenAI()
    yield fake
    fake.close()


def test_rival_answers_same_questions_with_same_system_prompt(fake_openai):
    kw = dict(max_tokens=32, temperature=0.0, timeout_s=5, max_retries=1, concurrency=3)
    good = Rival("good", fake_openai.base_url, "m1", "FAKE_KEY")
    res = ask_rival(good, PREDS, SYSTEM, env={"FAKE_KEY": "good-key"}, **kw)
    assert res.skipped is None and res.answers == REFS  # in question order despite concurrency
    assert len(fake_openai.requests) == 6
    assert all(r["messages"][0] == {"role": "system", "content": SYSTEM} and r["max_tokens"] == 32
               and r["temperature"] == 0.0 and r["auth"] == "Bearer good-key" for r in fake_openai.requests)

    missing = ask_rival(good, PREDS, SYSTEM, env={}, **kw)
    assert missing.answers is None and missing.skipped == "API key variable FAKE_KEY is not set"
    bad_key = ask_rival(good, PREDS, SYSTEM, env={"FAKE_KEY": "wrong"}, **kw)
    assert bad_key.skipped.startswith("HTTP 401") and "rejected the API key" in bad_key.skipped
    n = len(fake_openai.requests)
    broken = ask_rival(Rival("b", fake_openai.base_url, "broken", "FAKE_KEY"), PREDS[:2], SYSTEM,
                       env={"FAKE_KEY": "good-key"}, **{**kw, "concurrency": 1})
    assert broken.skipped.startswith("HTTP 500 server error: ") and "upstream exploded" in broken.skipped
    assert len(fake_openai.requests) - n == 2  # 1 try + 1 retry, then the second question is not even sent
    down = ask_rival(Rival("d", "http://127.0.0.1:9/v1", "m", "FAKE_KEY"), PREDS[:1], SYSTEM,
                     env={"FAKE_KEY": "k"}, **{**kw, "max_retries": 0})
    assert down.skipped.startswith("connection error")


@pytest.mark.parametrize(("reply", "expected"), [
    ('{"grade": "CORRECT"}', "correct"),
    ('Here is my grade:\n```json\n{"grade": "NOT_ATTEMPTED"}\n```', "not_attempted"),
    # the question's own words quoted before the conclusion decide nothing
    ('The question asks "is it correct that it ran on 56 qubits?"\n{"grade": "INCORRECT"}', "incorrect"),
    ("The answer looks INCORRECT at first, since it says fifty-six, but that is the gold.\nCORRECT", "correct"),
    ("CORRECT or INCORRECT? It declines.\nGrade: NOT_ATTEMPTED.", "not_attempted"),
    ('{"grade": "CORRECT"} was my first thought; on reflection: {"grade": "INCORRECT"}', "incorrect"),
    ('<think>{"grade": "CORRECT"}</think>\nINCORRECT', "incorrect"),
    ("The answer is not correct.", "incorrect"),
    ("B", "incorrect"),                                  # SimpleQA's letters
    ("It is CORRECT.\nIt is either CORRECT or INCORRECT.", None),   # a last line naming two grades says nothing
    ("CORRECT\nI cannot tell.", None),                  # only the last line counts, not the first grade anywhere
    ('{"grade": "maybe"}', None),
    ("", None),
])
def test_the_graders_reply_is_read_from_its_json_or_its_last_line(reply, expected):
    assert parse_grade(reply) == expected


def test_llm_grader_grades_caches_and_skips_with_a_reason(fake_openai, tmp_path):
    kw = dict(timeout_s=5, max_retries=0, concurrency=2, template=(REPO / "prompts/grade.txt").read_text())
    grader = Grader(fake_openai.base_url, "grader-1", "FAKE_KEY")
    items = [Item("How many qubits?", "56 qubits", ("fifty-six qubits",), a)
             for a in ("56 qubits.", "On 53 or 56 qubits.", "No idea.")]
    cache = Cache(tmp_path / "grader.sqlite")
    res = llm_grades(grader, items, cache, env={"FAKE_KEY": "good-key"}, **kw)
    # the fake grades by the gold's last word, after reasoning that names the other grade first
    assert res.skipped is None and res.grades == ["correct", "correct", "incorrect"] and res.requests == 3
    sent = list(fake_openai.requests)
    assert all(r["model"] == "grader-1" and r["temperature"] == 0.0 and r["messages"][0]["content"] == GRADER_SYSTEM
               for r in sent)
    user = sent[0]["messages"][1]["content"]
    assert user.startswith("Task: grade") and "<gold_target>\n56 qubits\n</gold_target>" in user
    assert "<also_accepted>\nfifty-six qubits\n</also_accepted>" in user and "{{" not in user
    # cached on disk: a rerun sends no request and needs no key
    cache.close()
    cache = Cache(tmp_path / "grader.sqlite")
    again = llm_grades(grader, items, cache, env={}, **kw)
    assert again.grades == res.grades and again.requests == 0 and len(fake_openai.requests) == 3
    # a new answer is one request; another grader model or another prompt shares no grade
    more = llm_grades(grader, items + [Item("q", "PyTorch", (), "pytorch")], cache, env={"FAKE_KEY": "good-key"}, **kw)
    assert more.grades[-1] == "correct" and more.requests == 1
    other = Grader(fake_openai.base_url, "grader-2", "FAKE_KEY")
    assert llm_grades(other, items[:1], cache, env={"FAKE_KEY": "good-key"}, **kw).requests == 1
    assert llm_grades(grader, items[:1], cache, env={"FAKE_KEY": "good-key"},
                      **{**kw, "template": kw["template"] + "\nBe strict."}).requests == 1
    # skipped, with the reason, and never an exception
    cache.close()
    keyless = llm_grades(other, items[1:], None, env={}, **kw)
    assert keyless.grades is None and keyless.skipped.startswith("API key variable FAKE_KEY is not set")
    broken = llm_grades(Grader(fake_openai.base_url, "broken", "FAKE_KEY"), items, None,
                        env={"FAKE_KEY": "good-key"}, **{**kw, "concurrency": 1})
    assert broken.skipped.startswith("HTTP 500 server error: ") and "upstream exploded" in broken.skipped
    assert broken.requests == 1
    babble = llm_grades(Grader(fake_openai.base_url, "babbler", "FAKE_KEY"), items[:1], None,
                        env={"FAKE_KEY": "good-key"}, **kw)
    assert "a reply with no grade" in babble.skipped and "Hard to say" in babble.skipped


def test_llm_grader_against_the_smoke_endpoint_grades_as_the_offline_grader():
    """The smoke endpoint answers `Task: grade` with the offline grader: the whole round trip (prompt, request,
    reply without response_format, parsing) gives the offline grades."""
    from qrb.grade import grade
    from standins.smoke import serve_smoke_endpoint

    q = "As of September 2024, how many qubits has the quantum Krylov algorithm been demonstrated on?"
    items = [Item(q, "56 qubits", ("fifty-six qubits",), a) for a in (
        "It has been demonstrated on up to 56 qubits.", "Fifty-six.", "On 5, 10, 27, 53, 56 qubits.",
        "See Ref. [56].", "It has not been demonstrated on 56 qubits.", ABSTAIN_ANSWER, "I'm not sure.")]
    items.append(Item("What algorithm does FIPS 205 specify?", "SLH-DSA", (), "Not SLH-DSA; it specifies ML-DSA."))
    with serve_smoke_endpoint(port=0) as ep:
        res = llm_grades(Grader(ep.base_url, "qrb-smoke-extractive", "QRB_T_GRADER"), items, {},
                         timeout_s=10, max_retries=0, concurrency=2, env={"QRB_T_GRADER": "any"},
                         template=(REPO / "prompts/grade.txt").read_text())
    assert res.skipped is None and res.requests == len(items)
    assert res.grades == [grade(it.answer, it.target, it.aliases, it.question) for it in items]
    assert res.grades == ["correct", "correct", "incorrect", "incorrect", "incorrect", "not_attempted",
                          "not_attempted", "incorrect"]


# ---------------------------------------------------------------------------------------------------------------
# Local models: CE counted as qrb.model counts it; the whole core and the stage on the tiny Llama

@pytest.fixture(scope="module")
def peft_tiny(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from qrb.model import load_causal_lm, load_tokenizer, resize_for_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    base = load_causal_lm(str(tiny_model_dir))
    resize_for_tokenizer(base, tok)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    return model, tok


def test_per_row_nll_matches_the_models_own_loss(peft_tiny):
    """Each row's summed NLL equals transformers' own causal-LM loss with answer-only labels (an independent
    computation), times the answer tokens; their ratio of sums is token_weighted_ce."""
    import torch

    from qrb.model import encode_pair, token_nll_rows, token_weighted_ce

    model, tok = peft_tiny
    rows = [{"question": q, "answer": a} for q, a in zip(PREDS, REFS)]
    per_row = token_nll_rows(model, tok, rows, SYSTEM, batch_size=4, max_length=4096)
    for row, (nll, count) in zip(rows, per_row):
        ids, plen = encode_pair(tok, SYSTEM, row["question"], row["answer"], 4096)
        labels = torch.tensor([[-100] * plen + ids[plen:]])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=labels).loss.item()
        assert count == len(ids) - plen
        assert nll == pytest.approx(loss * count, rel=1e-4)
    ce = token_weighted_ce(model, tok, rows, SYSTEM, batch_size=4, max_length=4096)
    assert sum(n for n, _ in per_row) / ce["tokens"] == pytest.approx(ce["cross_entropy"], rel=1e-5)


def bag_of_words(texts):
    """A stand-in for MiniLM: hashed bag-of-words unit vectors (deterministic, no model)."""
    import hashlib

    import numpy as np

    out = np.zeros((len(texts), 64), dtype="float32")
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_core_grades_four_local_models_on_every_set_with_the_llm_grader(peft_tiny, scorer, corpus_dir, fake_openai,
                                                                       tmp_path):
    """base, fine_tuned, rag and fine_tuned_rag on golden, seen, eval and invented; an empty seen set is n=0, not a
    crash; every answer graded (the LLM grader where the row has a gold, the offline grade kept beside it; invented
    papers and rows without a gold offline only), the rates, the hallucination rate, the paired gains against base,
    the RAG rows' recall@k and citation accuracy."""
    from qrb.grade import grade
    from stages.evaluate.core import evaluate

    model, tok = peft_tiny
    papers = [json.loads(x) for x in (corpus_dir / "quantum-papers.jsonl").read_text().splitlines()][:8]
    pairs = [{"question": f"What does the paper \"{pp['title']}\" find?", "answer": pp["abstract"][:120],
              "short_answer": pp["abstract"].split()[0], "aliases": [], "kind": "fact",
              "doi": pp["doi"], "published": pp["published"]} for pp in papers[:4]]
    pairs[3]["short_answer"] = ""  # a row written before short answers: graded attempted or not only
    golden = [question_record(json.loads(x)) for x in (REPO / "data/golden/questions.jsonl").read_text().splitlines()]
    invented = [{"question": f"What does the paper \"{t}\" report?", "answer": ABSTAIN_ANSWER, "short_answer": "",
                 "aliases": [], "kind": "abstain"} for t in ("Quantum gravity in a teacup", "Photonic mayonnaise")]
    sets = {"golden": [{**g, "short_answer": g["answer"].split()[-1]} for g in golden[:3]], "seen": [],
            "eval": pairs, "invented": invented}
    p = params(max_new_tokens=6, batch_size=4, bootstrap_samples=100, rag=True, rivals=(),
               grader=Grader(fake_openai.base_url, "grader-1", "QRB_T_GRADER"), min_n_for_interval=4)
    base = {"seed": 1, "system_prompt": SYSTEM, "max_length": 512}
    retrieval = (Retriever(passages_from_papers(papers), bag_of_words), RetrievalParams("dense", 2, -1.0, 80))
    cache = Cache(tmp_path / "grader.sqlite")
    metrics, preds, skipped = evaluate(base, p, model, tok, sets, papers=papers, retrieval=retrieval, scorer=scorer,
                                       grader_cache=cache, env={"QRB_T_GRADER": "good-key"})
    models = ["base", "fine_tuned", "rag", "fine_tuned_rag"]
    assert skipped == {}
    assert {s: list(m) for s, m in metrics.items() if not s.endswith("cutoff")} == \
        {"golden": models, "seen": models, "eval": models, "invented": models}
    assert metrics["seen"] == {m: {"n": 0} for m in models}
    ev = metrics["eval"]
    assert ev["rag"]["recall_at_k"] == ev["fine_tuned_rag"]["recall_at_k"]  # the same passages
    assert "cross_entropy" not in ev["rag"] and "recall_at_k" not in ev["base"]
    assert "recall_at_k" not in metrics["invented"]["rag"]  # no paper to find
    for name in models:
        rows = [r for r in preds if r["set"] == "eval" and r["model"] == name]
        gold = [r for r in rows if r["short_answer"]]
        # the tiny model's reading states nothing its excerpts do: the RAG rows decline it (qrb.sources.vouched),
        # graded not attempted without asking the grader
        declined = [r["prediction"] == ABSTAIN_ANSWER for r in gold]
        assert all(declined) if name in ("rag", "fine_tuned_rag") else not any(declined)
        right = [not d and fake_says_correct(r["short_answer"], r["prediction"])  # the LLM's grades decide
                 for r, d in zip(gold, declined)]
        assert [r["grade"] for r in gold] == ["not_attempted" if d else "correct" if c else "incorrect"
                                              for c, d in zip(right, declined)]
        assert all(r.get("grade_offline", r["grade"]) == grade(r["prediction"], r["short_answer"], (), r["question"])
                   for r in gold)
        tried = 3 - sum(declined)
        assert ev[name]["graded_n"] == 3 and ev[name]["correct"] == pytest.approx(sum(right) / 3)
        assert ev[name]["incorrect"] == pytest.approx((tried - sum(right)) / 3)
        assert ev[name]["not_attempted"] == pytest.approx(sum(declined) / 3)
        assert ev[name].get("hallucination_rate") == (pytest.approx(1 - sum(right) / tried) if tried else None)
        assert ev[name].get("offline_agreement") == (pytest.approx(  # over the answers the grader graded
            sum(r["grade"] == r["grade_offline"] for r in gold) / 3) if tried else None)
        assert rows[3]["grade"] in ("no_gold", "not_attempted") and "grade_offline" not in rows[3]
        assert ("correct_gain" in ev[name]) == ("not_attempted_gain" in ev[name]) == (name != "base")
        inv = metrics["invented"][name]  # no gold: offline only, and any attempt is invented
        assert inv["correct"] == 0.0 and inv["incorrect"] + inv["not_attempted"] == pytest.approx(1.0)
        assert inv.get("hallucination_rate", 1.0) == 1.0
    assert ev["rag"]["correct_gain"] == pytest.approx(ev["rag"]["correct"] - ev["base"]["correct"])
    # intervals need min_n_for_interval (4) questions that define the rate: 3 graded, 4 that may not attempt
    assert ev["rag"]["correct_gain_ci95"] == ev["base"]["correct_ci95"] == "n too small"
    assert isinstance(ev["base"]["not_attempted_ci95"], list)
    # without the grader, and without the RAG rows (evaluate.rag off): the offline grades, the same CE
    lean, lean_preds, _ = evaluate(base, dataclasses.replace(p, rag=False, grader=None), model, tok,
                                   {"eval": pairs}, papers=papers, scorer=scorer)
    assert list(lean["eval"]) == ["base", "fine_tuned"]
    assert lean["eval"]["base"]["cross_entropy"] == pytest.approx(ev["base"]["cross_entropy"])
    assert all(r["grade"] == r2["grade_offline"] for r, r2 in zip(lean_preds, (r for r in preds if r["set"] == "eval"))
               if r["short_answer"])  # no grader: the offline grades
    assert metrics["golden"]["base"]["rouge1_ci95"] == "n too small"  # 3 < min_n_for_interval
    distinct = {(r["question"], r["short_answer"], r["prediction"]) for r in preds
                if r["short_answer"] and r["prediction"] != ABSTAIN_ANSWER}  # the apps' abstention: not asked
    assert len(cache.keys()) == len(fake_openai.requests) == len(distinct) >= 2 * (3 + 3)  # one grade per distinct
    assert {r["model"] for r in preds if "cited" in r} == {"rag", "fine_tuned_rag"}


def fake_local(monkeypatch, sent: dict[str, list[str]]):
    """A LocalModel whose generation records each row's prompts (by its progress label) and answers "answer <i>",
    but the second one: the last word of excerpt [2]'s title, citing it, where the prompt shows one ("answer 1 [2]"
    closed-book)."""
    import contextlib
    import types

    from qrb.retrieval import excerpts
    from stages.evaluate import core

    def generate(model, tok, prompts, system, **kw):
        sent[kw["desc"]] = list(prompts)
        return [f"{shown[1].title.split()[-1]} [2]" if i == 1 and len(shown := excerpts(q)) > 1
                else f"answer {i}" + (" [2]" if i == 1 else "") for i, q in enumerate(prompts)]

    monkeypatch.setattr(core, "generate_answers", generate)
    monkeypatch.setattr(core, "token_nll_rows", lambda model, tok, pairs, system, **kw: [(1.0, 1)] * len(pairs))
    return core.LocalModel(types.SimpleNamespace(disable_adapter=contextlib.nullcontext), None, SYSTEM, params(), 512)


def test_the_rag_rows_send_the_model_what_the_apps_send_it(monkeypatch, corpus_dir):
    """For the same question, index and `retrieval:` params, both RAG rows hand the model the messages `qrb ask --rag`
    renders (Bot.ground, then Bot.messages) and count as cited what the app lists as sources: the papers of the
    excerpts the answer names ([n]), graded without the markers; an answer naming none cites nothing."""
    from apps.bot import Bot
    from qrb.model import prompt_messages
    from stages.evaluate.core import local_answers

    papers = [json.loads(x) for x in (corpus_dir / "quantum-papers.jsonl").read_text().splitlines()][:6]
    retrieval = (Retriever(passages_from_papers(papers), bag_of_words), RetrievalParams("hybrid", 2, -1.0, 120))
    rows = [{"question": f"What does the paper \"{p['title']}\" show?", "answer": "-", "doi": p["doi"]}
            for p in papers[:3]]
    sent: dict[str, list[str]] = {}
    answers, extras = local_answers(fake_local(monkeypatch, sent), "eval", rows, retrieval)
    assert list(answers) == ["base", "fine_tuned", "rag", "fine_tuned_rag"]
    assert sent["eval/base"] == sent["eval/fine_tuned"] == [r["question"] for r in rows]
    bot = Bot(None, None, SYSTEM, None, retriever=retrieval[0], retrieval=retrieval[1])
    for i, r in enumerate(rows):
        conv, shown = bot.ground([{"role": "user", "content": r["question"]}])
        assert "[1] " in conv[-1]["content"] and r["question"] in conv[-1]["content"]
        for name in ("rag", "fine_tuned_rag"):
            assert prompt_messages(SYSTEM, sent[f"eval/{name}"][i]) == bot.messages(conv)
            assert extras[name][i]["shown"] == [x.doi for x in shown] and len(shown) == 2
            assert extras[name][i]["cited"] == ([shown[1].doi] if i == 1 else [])  # fake_local: answer 1 cites [2]
            # what excerpt [2] states stands; an answer citing no excerpt is declined (qrb.sources.vouched)
            assert answers[name][i] == (shown[1].title.split()[-1] if i == 1 else ABSTAIN_ANSWER)


def test_below_min_score_the_rag_rows_abstain_without_asking_the_model(monkeypatch, corpus_dir):
    """A question no passage reaches retrieval.min_score for gets the apps' abstention, unasked and citing nothing
    (graded not attempted: no citation accuracy, its paper not recalled); the question that does reach it is asked."""
    from apps.bot import Bot
    from qrb.grade import grade
    from stages.evaluate.core import citation_columns, local_answers

    papers = [json.loads(x) for x in (corpus_dir / "quantum-papers.jsonl").read_text().splitlines()][:6]
    retrieval = (Retriever(passages_from_papers(papers), bag_of_words), RetrievalParams("dense", 1, 0.9, 120))
    own = f"{papers[0]['title']}. {' '.join(papers[0]['abstract'].split())}"  # its passage's text: cosine 1
    rows = [{"question": "Is photonic mayonnaise stable at noon?", "answer": "-", "doi": papers[1]["doi"]},
            {"question": own, "answer": "-", "doi": papers[0]["doi"]}]
    sent: dict[str, list[str]] = {}
    answers, extras = local_answers(fake_local(monkeypatch, sent), "eval", rows, retrieval)
    assert Bot(None, None, SYSTEM, None, retriever=retrieval[0], retrieval=retrieval[1]).ground(
        [{"role": "user", "content": rows[0]["question"]}])[1] is None  # the app abstains on it too
    for name in ("rag", "fine_tuned_rag"):
        # asked once; its "answer 0" names no excerpt, so that is declined too (qrb.sources.vouched)
        assert answers[name] == [ABSTAIN_ANSWER, ABSTAIN_ANSWER] and len(sent[f"eval/{name}"]) == 1
        assert [e["shown"] for e in extras[name]] == [[], [papers[0]["doi"]]]
        assert [e["cited"] for e in extras[name]] == [[], []]
    g = grade(ABSTAIN_ANSWER, "56 qubits", (), rows[0]["question"])
    assert g == "not_attempted"
    assert citation_columns(rows[0], [], [], g) == {"recall_at_k": 0.0, "citation_accuracy": None}


def test_recall_at_k_and_citation_accuracy_on_a_hand_made_case():
    """recall@k: the question's paper (DOI, any case) among the passages shown, over questions with a DOI; citation
    accuracy: the first paper the answer cites is the question's, over attempted answers (citing nothing is wrong)."""
    from stages.evaluate.core import citation_columns

    a, b, c, d, e = (f"10.22331/q-2024-01-0{i}-{i}" for i in range(1, 6))
    case = [({"doi": a}, [a.upper(), "x"], [a.upper()], "correct"),  # recalled, cited first
            ({"doi": b}, ["x", b], ["x", b], "incorrect"),  # recalled, cited second: a wrong citation
            ({"doi": c}, [], [], "not_attempted"),  # nothing retrieved: abstained, out of citation accuracy
            ({"doi": d}, [d], [], "incorrect"),  # shown but cited nothing: attempted, citing nothing: wrong
            ({"doi": e}, ["y"], ["y"], "not_attempted"),
            ({"doi": None}, ["z"], ["z"], "incorrect")]  # an invented paper: neither
    cols = [citation_columns(row, shown, cited, g) for row, shown, cited, g in case]
    assert [c["recall_at_k"] for c in cols] == [1.0, 1.0, 0.0, 1.0, 0.0, None]
    assert [c["citation_accuracy"] for c in cols] == [1.0, 0.0, None, 0.0, None, None]
    rows = [{**r, **col} for r, col in zip(graded_rows(["correct"] * 6), cols)]
    m = aggregate(rows, seed=1, samples=200, min_n=2)
    assert m["recall_at_k"] == pytest.approx(3 / 5) and m["citation_accuracy"] == pytest.approx(1 / 3)
    assert isinstance(m["recall_at_k_ci95"], list) and isinstance(m["citation_accuracy_ci95"], list)
    assert "recall_at_k" not in aggregate(graded_rows(["correct"] * 6), seed=1, samples=200)  # a row without RAG


@pytest.mark.slow
def test_stage_main_scores_every_model_and_reports_skipped_rivals(peft_tiny, tiny_model_dir, corpus_dir, fake_openai,
                                                                  tmp_path, monkeypatch):
    """The stage end to end in a scratch directory: base, fine-tuned, RAG, fine-tuned + RAG, a rival via the fake
    server, a rival without a key and one that keeps failing (skipped, the rest still scored), the four question
    sets and their freshness splits, grades by the LLM grader at the smoke endpoint whose cached grades make a rerun
    send no grading request, all outputs."""
    from standins.smoke import serve_smoke_endpoint

    model, tok = peft_tiny
    papers = [json.loads(x) for x in (corpus_dir / "quantum-papers.jsonl").read_text().splitlines()][:12]
    (tmp_path / "artifacts/train/adapter").mkdir(parents=True)
    model.save_pretrained(tmp_path / "artifacts/train/adapter")
    tok.save_pretrained(tmp_path / "artifacts/train/adapter")
    (tmp_path / "artifacts/scrape").mkdir(parents=True)
    (tmp_path / "artifacts/scrape/papers.jsonl").write_text("".join(json.dumps(p) + "\n" for p in papers))
    Retriever(passages_from_papers(papers)).save(tmp_path / "artifacts/index", {"model": PACKAGED_MINILM})
    (tmp_path / "artifacts/validate").mkdir(parents=True)
    evals = [{"question": f"What does the paper \"{p['title']}\" study?", "answer": p["abstract"][:160],
              "short_answer": p["title"].split()[-1], "aliases": [], "kind": "fact",
              "doi": p["doi"], "published": p["published"]} for p in papers[:4]]
    evals[0]["published"] = "2023-05-01"  # one before the cutoff
    (tmp_path / "artifacts/validate/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    seen = [{"question": f"Tell me what \"{p['title']}\" reports.", "answer": p["abstract"][:140], "doi": p["doi"],
             "title": p["title"], "published": p["published"], "fact_id": f"f{i}", "variant": 0,
             "source_question": "What does it show?", "prompt_id": "paraphrase", "model": "m", "response_id": "r",
             "chunk": 0, "short_answer": p["title"].split()[-1], "aliases": [], "kind": "fact"}
            for i, p in enumerate(papers[4:7])]
    (tmp_path / "artifacts/validate/seen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seen))
    invented = [{"question": f"What does the paper \"{t}\" report?", "answer": ABSTAIN_ANSWER, "short_answer": "",
                 "aliases": [], "kind": "abstain"} for t in ("Quantum gravity in a teacup", "Photonic mayonnaise")]
    (tmp_path / "artifacts/validate/invented.jsonl").write_text("".join(json.dumps(r) + "\n" for r in invented))
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/grade.txt").write_text((REPO / "prompts/grade.txt").read_text())
    golden = (REPO / "data/golden/questions.jsonl").read_text().splitlines()[:4]
    (tmp_path / "golden.jsonl").write_text("\n".join(golden) + "\n")
    rivals = [{"name": "fake.rival", "base_url": fake_openai.base_url, "model": "m1", "api_key_env": "QRB_T_KEY"},
              {"name": "keyless", "base_url": fake_openai.base_url, "model": "m1", "api_key_env": "QRB_T_NONE"},
              {"name": "flaky", "base_url": fake_openai.base_url, "model": "broken", "api_key_env": "QRB_T_KEY"}]
    import yaml

    cfg = {"base": {"seed": 5, "model": str(tiny_model_dir),
                    "system_prompt": SYSTEM, "hf_offline": True, "max_length": 4096},
           "evaluate": {"golden": "golden.jsonl", "bertscore_model": OFFLINE_BERTSCORE, "bertscore_num_layers": 6,
                        "max_new_tokens": 12, "batch_size": 8, "greedy": True, "bootstrap_samples": 200,
                        "knowledge_cutoff": "2023-12-31", "rag": True, "rivals": rivals,
                        "rival_timeout_s": 5, "rival_max_retries": 0, "rival_concurrency": 2,
                        "min_n_for_interval": 2,
                        "grader": {"base_url": None, "model": "qrb-smoke-extractive", "api_key_env": "QRB_T_KEY"}},
           "retrieval": {"method": "hybrid", "top_k": 2, "min_score": -1.0, "max_chars": 200}}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QRB_T_KEY", "good-key")
    monkeypatch.delenv("QRB_T_NONE", raising=False)
    with serve_smoke_endpoint(port=0) as ep:
        cfg["evaluate"]["grader"]["base_url"] = ep.base_url
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg))
        run_evaluate_stage([])  # not pytest's own argv
        graded = len(ep.requests)
        # the grades are cached: the rerun sends the rival its questions again, the grader nothing
        assert graded == len(Cache(Path("cache/evaluate/grader.sqlite")).keys()) > 0
        metrics = json.loads(Path("reports/evaluate.json").read_text())
        run_evaluate_stage([])
        assert len(ep.requests) == graded
    assert json.loads(Path("reports/evaluate.json").read_text()) == metrics

    # the DVC metrics file: per whole set and model, the headline numbers only (no interval, n or subset)
    head = json.loads(Path("metrics/evaluate.json").read_text())
    assert set(head) == {"golden", "seen", "eval", "invented"}
    assert set(head["eval"]["base"]) == set(HEADLINE_METRICS) and "cross_entropy" not in head["eval"]["rival_fake_rival"]
    # the tiny model's reading states nothing its excerpts do: every RAG answer is declined, so no citation accuracy
    assert head["eval"]["rag"]["not_attempted"] == 1.0 and "citation_accuracy" not in head["eval"]["rag"]
    assert set(RAG_HEADLINE) - {"citation_accuracy"} <= set(head["eval"]["rag"])
    assert "recall_at_k" not in head["eval"]["fine_tuned"]
    assert all(head[s][m][k] == metrics[s][m][k] for s in head for m in head[s] for k in head[s][m])
    # seen: every paper of the corpus slice is from 2024, so no before-cutoff split; invented papers have no date
    assert set(metrics) == {"golden", "golden_after_cutoff", "golden_before_cutoff", "seen", "seen_after_cutoff",
                            "eval", "eval_after_cutoff", "eval_before_cutoff", "invented"}
    models = {"fine_tuned", "base", "rag", "fine_tuned_rag", "rival_fake_rival"}
    assert all(set(by_model) == models for by_model in metrics.values())
    assert metrics["eval"]["base"]["n"] == 4 and metrics["eval_after_cutoff"]["rag"]["n"] == 3
    assert metrics["seen"]["fine_tuned"]["n"] == 3 and metrics["invented"]["base"]["n"] == 2
    # golden by first-public date: card-1 (DOI 2024, arXiv 2306) and card-3 (arXiv 2307) before, card-2 undated,
    # card-4 (arXiv 2407) after
    assert metrics["golden_after_cutoff"]["base"]["n"] == 1 and metrics["golden_before_cutoff"]["base"]["n"] == 2
    assert metrics["golden_after_cutoff"]["base"]["rouge1_ci95"] == "n too small"
    for m in metrics["eval"].values():
        assert {"bertscore_f1", "rouge1", "rouge2", "rougeL", "bleu", "bleu_ci95", "bertscore_f1_ci95",
                "sentence_bleu", "correct", "correct_ci95", "incorrect",
                "not_attempted", "not_attempted_ci95", "answer_words"} <= set(m)
        assert m["graded_n"] == 4  # the smoke endpoint grades as the offline grader, where it is asked (not RAG's)
        assert m.get("offline_agreement") == (None if m.get("recall_at_k") is not None else 1.0)
        assert m["correct"] + m["incorrect"] + m["not_attempted"] == pytest.approx(1.0)
    for name in models - {"base"}:
        assert {"correct_gain", "correct_gain_ci95", "not_attempted_gain"} <= set(metrics["seen"][name])
    assert "cross_entropy" not in metrics["eval"]["rag"] and "cross_entropy" not in metrics["eval"]["rival_fake_rival"]
    # the index holds every question's paper and min_score lets all through: each is among the top 2
    assert metrics["eval"]["rag"]["recall_at_k"] == metrics["seen"]["fine_tuned_rag"]["recall_at_k"] == 1.0
    assert isinstance(metrics["eval"]["rag"]["recall_at_k_ci95"], list)
    # the base row really is the adapter disabled: different CE from the fine-tuned row
    assert metrics["eval"]["base"]["cross_entropy"] != metrics["eval"]["fine_tuned"]["cross_entropy"]

    preds = [json.loads(x) for x in Path("artifacts/evaluate/predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 5 * (4 + 3 + 4 + 2)  # 4 golden + 3 seen + 4 eval + 2 invented questions, 5 scored models
    assert {r["grade"] for r in preds} <= {"correct", "incorrect", "not_attempted"}
    rag = [r for r in preds if r["model"] == "rag" and r["set"] == "eval"]
    assert all(len(r["shown"]) == 2 for r in rag) and {r["after_cutoff"] for r in rag} == {True, False}
    table = Path("reports/eval_table.md").read_text()
    assert "| RAG: base + the apps' retrieval (hybrid top-2, min score -1) |" in table
    assert "| fine-tuned + RAG: adapter + the same passages |" in table
    assert "fake.rival (m1, endpoint)" in table
    assert "keyless (m1, endpoint): skipped** (API key variable QRB_T_NONE is not set)" in table
    assert "flaky (broken, endpoint): skipped** (HTTP 500" in table
    assert "### eval questions (held-out papers) on papers first public after the knowledge cutoff (2023-12-31) " \
           "(n=3)" in table
    assert "### seen questions (seen papers, new questions) (n=3)" in table
    assert "### invented questions (papers that do not exist) (n=2)" in table
    assert "| model | correct | Δ correct vs base | not attempted | incorrect | hallucination rate | recall@k | " \
           "citation accuracy |" in table
    assert "graded against the question's short gold answer by LLM grader (qrb-smoke-extractive at " in table
    for set_name in ("golden", "seen", "eval", "invented"):  # one chart per question set: models x the grades' rates
        csv = Path(f"plots/evaluate/scores/{set_name}.csv").read_text().splitlines()
        expected = sum(k in m for m in metrics[set_name].values() for k in PLOT_METRICS)
        assert csv[0] == "label,model,metric,score,lo,hi" and len(csv) == 1 + expected >= 1 + 5 * 3
    assert sorted(p.stem for p in Path("plots/evaluate/scores").iterdir()) == ["eval", "golden", "invented", "seen"]


@pytest.mark.slow
def test_dvc_metrics_diff_shows_per_model_per_metric_deltas(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def run(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q")
    run("git", "config", "user.email", "t@t")
    run("git", "config", "user.name", "t")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\n")
    (tmp_path / "metrics").mkdir()
    old = {"eval": {"base": {"bleu": 10.0, "rouge1": 0.3}, "fine_tuned": {"bleu": 12.0, "rouge1": 0.35}}}
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(old))
    run("git", "add", "-A")
    run("git", "commit", "-qm", "exp 1")
    new = {"eval": {"base": {"bleu": 10.0, "rouge1": 0.3}, "fine_tuned": {"bleu": 15.5, "rouge1": 0.4}}}
    (tmp_path / "metrics/evaluate.json").write_text(json.dumps(new))
    diff = json.loads(run(sys.executable, "-m", "dvc", "metrics", "diff", "--json"))["metrics/evaluate.json"]
    assert diff["eval.fine_tuned.bleu"] == {"old": 12.0, "new": 15.5, "diff": 3.5}
    assert diff["eval.fine_tuned.rouge1"]["diff"] == pytest.approx(0.05)
    assert "eval.base.bleu" not in diff  # unchanged (--all shows them)


# ---------------------------------------------------------------------------------------------------------------
# First-public dates, no interval below a minimum n, both BLEUs

def test_a_paper_is_dated_by_when_it_first_became_public():
    """A preprint public on arXiv in June 2023 that the journal published in 2024 is *before* a 2023-12-31 cutoff:
    the arXiv id's YYMM is its v1 month. Before the fix the journal date (2024) won."""
    papers = [{"doi": "10.22331/q-2024-03-05-1", "arxiv": "arXiv:2306.01234v3", "published": "2024-03-05"}]
    rows = [question_record(r) for r in [
        {"doi": "10.22331/q-2024-03-05-1", "published": "2024-03-05"},          # eval pair: arXiv via papers.jsonl
        {"paper_doi": "10.22331/q-2024-06-11-1364", "paper_arxiv": "2306.08595"},  # golden card-1: DOI 2024
        {"doi": "10.22331/q-2024-02-01-9", "published": "2024-02-01"},          # no arXiv id known: journal date
        {"arxiv": "quant-ph/0601001", "published": "2007-05-01"}]]              # an old-style arXiv id
    subsets, dates = freshness_subsets(rows, dt.date(2023, 12, 31), papers)
    assert dates == [dt.date(2023, 6, 1), dt.date(2023, 6, 1), dt.date(2024, 2, 1), dt.date(2006, 1, 1)]
    assert subsets == {"after_cutoff": [2], "before_cutoff": [0, 1, 3]}


def test_no_interval_below_the_minimum_n(scorer):
    """n=1 gave a degenerate interval like [0.217, 0.217]; below `min_n_for_interval` JSON and table say so."""
    from stages.evaluate.report import markdown_table

    one = aggregate(scorer.rows(PREDS[:1], REFS[:1]), seed=1, samples=200, min_n=3)
    assert one["n"] == 1 and one["rouge1"] > 0
    assert one["rouge1_ci95"] == "n too small" and one["bleu_ci95"] == "n too small"
    many = aggregate(scorer.rows(PREDS, REFS), seed=1, samples=200, min_n=3)
    assert isinstance(many["rouge1_ci95"], list) and many["rouge1_ci95"][0] < many["rouge1_ci95"][1]
    table = markdown_table({"eval_after_cutoff": {"base": one}, "eval": {"base": many}}, {}, dt.date(2023, 12, 31))
    after, whole = table.split("### eval questions (held-out papers) (n=6)")
    assert "first public after the knowledge cutoff (2023-12-31) (n=1)" in after
    assert f"{one['rouge1']:.3f} (n too small)" in after and f"{one['rouge1']:.3f} [" not in after
    assert f"{many['rouge1']:.3f} [{many['rouge1_ci95'][0]:.3f}, " in whole


def test_bleu_is_reported_as_corpus_and_as_mean_sentence_bleu_labelled(scorer):
    """The card's "mean/avg" BLEU is a mean of sentence BLEUs; the project's `bleu` is sacrebleu's corpus BLEU
    (2-6x lower). Both are reported, each labelled, so the card's numbers can be compared."""
    import sacrebleu

    from stages.evaluate.report import markdown_table

    m = aggregate(scorer.rows(PREDS, REFS), seed=1, samples=200)
    sentence = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(PREDS, REFS)]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-9)
    assert m["sentence_bleu"] == pytest.approx(sum(sentence) / len(sentence), abs=1e-9)
    lo, hi = m["sentence_bleu_ci95"]
    assert lo <= m["sentence_bleu"] <= hi and lo < hi
    table = markdown_table({"eval": {"base": m}}, {}, dt.date(2023, 12, 31))
    assert "| BLEU (corpus) |" in table and "| BLEU (mean sentence) |" in table


def test_the_rag_rows_answer_from_the_excerpts_first_and_a_gated_adapter_from_memory_where_they_state_nothing(
        monkeypatch, corpus_dir):
    """fine_tuned_rag as the apps answer with a gate: every question with passages is read; a read answer an excerpt
    it cites states stands, even over a closed-book answer the gate kept (a small model confabulates a paper it never
    saw with confidence); where the excerpts state nothing, the closed-book answer the gate kept, citing the passage
    shown that states it (or nothing when none does); else the abstention."""
    from qrb.retrieval import excerpts
    from stages.evaluate import core
    from stages.evaluate.core import local_answers

    papers = [json.loads(x) for x in (corpus_dir / "quantum-papers.jsonl").read_text().splitlines()][:6]
    retrieval = (Retriever(passages_from_papers(papers), bag_of_words), RetrievalParams("hybrid", 2, -1.0, 4000))
    rows = [{"question": f"What does the paper \"{p['title']}\" show?", "answer": "-", "doi": p["doi"]}
            for p in papers[:4]]
    word = [max(p["abstract"].split()[:12], key=len).strip(".,;:()") for p in papers[:4]]  # each stated by its own
    closed_book = [f"{word[1]}.", ABSTAIN_ANSWER, f"{word[2]}.", "Photonic mayonnaise."]
    reads = [f"{word[0]} [{{n}}].", "Photonic mayonnaise [{n}].", ABSTAIN_ANSWER, "Nothing at all [{n}]."]
    sent: dict[str, list[str]] = {}
    local = dataclasses.replace(fake_local(monkeypatch, sent), gate=Gate(0.5))

    def generate(model, tok, prompts, system, **kw):
        sent[kw["desc"]] = list(prompts)
        if not kw["desc"].endswith("rag"):
            return closed_book if kw["desc"].endswith("/fine_tuned") else ["Base."] * len(prompts)
        titles = [[x.title for x in excerpts(q)] for q in prompts]
        own = [t.index(" ".join(p["title"].split())) + 1 if " ".join(p["title"].split()) in t else 1
               for t, p in zip(titles, papers)]
        return [r.format(n=n) for r, n in zip(reads, own, strict=True)]

    monkeypatch.setattr(core, "generate_answers", generate)
    answers, extras = local_answers(local, "eval", rows, retrieval)
    assert len(sent["eval/fine_tuned_rag"]) == len(sent["eval/rag"]) == 4  # every question is read
    assert answers["fine_tuned_rag"] == [
        f"{word[0]}.",  # read and stated by the excerpt it cites: it stands over the closed-book answer
        ABSTAIN_ANSWER,  # read but stated by none, and declined closed-book
        f"{word[2]}.", "Photonic mayonnaise."]  # the excerpts state nothing: the closed-book answer
    cited = [x["cited"] for x in extras["fine_tuned_rag"]]
    assert cited == [[rows[0]["doi"]], [], [rows[2]["doi"]], []]  # memory cites the passage stating it, if any
    answers, _ = local_answers(dataclasses.replace(local, gate=None), "eval", rows, retrieval)
    assert answers["fine_tuned_rag"] == [f"{word[0]}.", ABSTAIN_ANSWER, ABSTAIN_ANSWER, ABSTAIN_ANSWER]  # no memory
