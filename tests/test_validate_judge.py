"""The validate stage's optional LLM judge against the smoke endpoint, which judges deterministically from
the paper text of a `Task: judge` prompt: planted wrong answers (answers of another paper) are quarantined with the
judge's reason and the good pairs kept; verdicts are cached (a rerun sends no request), a `kill -9` resumes, and the
cost cap stops the stage before it overspends, in one line. Real corpus papers; pairs written as the smoke endpoint
writes them for generate."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qrb import llm
from qrb.errors import ConfigError, TransientError
from qrb.io import write_jsonl
from stages.validate import JudgeEndpoint, JudgeParams, ValidateParams
from stages.validate import judge as judge_mod
from stages.validate.core import summary, validate
from stages.validate.judge import Judge, make_item, messages, parse_verdict
from standins.smoke import Faults, extractive_pairs, serve_smoke_endpoint
from standins.smoke.rewriter import judge_verdict

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = (REPO / "prompts/judge.txt").read_text(encoding="utf-8").strip()
KEY_ENV = "QRB_TEST_JUDGE_KEY"
SECRET = "sk-judge-MARKER-3f9a-never-write-me"
ENV = {KEY_ENV: SECRET}


def corpus(n: int = 10) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data/corpus/quantum-papers.jsonl").read_text().splitlines()]
    papers = {r["doi"]: r for r in rows if r.get("doi") and len(r.get("abstract") or "") > 400}
    return [papers[d] for d in sorted(papers)][:n]


PAPERS = corpus()
TRAIN_PAPERS, EVAL_PAPERS = PAPERS[:8], PAPERS[8:]


def pair(paper: dict, q: str, a: str, n: int, prompt_id: str = "factual") -> dict:
    return {"question": q, "answer": a, "doi": paper["doi"], "title": paper["title"],
            "published": paper["published"], "prompt_id": prompt_id, "model": "qrb-smoke-extractive",
            "response_id": f"r-{paper['doi']}-{n}", "chunk": 0, "fact_id": f"{paper['doi'][-6:]}-{n}", "variant": 0}


def good_pairs(papers: list[dict]) -> list[dict]:
    out = []
    for p in papers:
        for focus in ("factual", "results"):
            out += [pair(p, x["question"], x["answer"], len(out), focus)
                    for x in extractive_pairs(p["title"], p["abstract"], focus, 2)]
    return out


def planted(papers: list[dict]) -> list[dict]:
    """A question about each paper (a wording no good pair uses) answered with a sentence of the next paper."""
    out = []
    for i, p in enumerate(papers):
        other = papers[(i + 1) % len(papers)]
        q = extractive_pairs(p["title"], p["abstract"], "methods", 1)[0]["question"]
        a = extractive_pairs(other["title"], other["abstract"], "novelty", 1)[0]["answer"]
        out.append(pair(p, q, a, 1000 + i, "methods"))
    return out


# The token checks off: what the judge alone catches (with them on, some answers of another paper would already fail
# `ungrounded`, and the judge is never asked about a row that failed a cheap check)
P = ValidateParams(min_question_chars=15, max_question_chars=400, min_answer_chars=10, max_answer_chars=2000,
                   min_rows=1, max_fail_rate=0.5, max_paper_share=1.0, min_grounding=0.0, min_similarity=0.0,
                   min_eval_rows=0, max_eval_fraction=0.9)


def with_judge(base_url: str, **kw) -> ValidateParams:
    kw = {"price_input_per_1m": 1.0, "price_output_per_1m": 2.0, "max_cost_usd": 1.0, "timeout_s": 5.0,
          "max_retries": 1, **kw}
    jp = JudgeParams(endpoint=JudgeEndpoint(base_url, "qrb-smoke-extractive", KEY_ENV), **kw)
    return dataclasses.replace(P, judge=jp)


# ---------------------------------------------------------------------------------------------------------------
# the parts

def test_the_smoke_judge_rates_from_the_paper_text_alone():
    p, other = PAPERS[0], PAPERS[1]
    good = extractive_pairs(p["title"], p["abstract"], "factual", 1)[0]
    foreign = extractive_pairs(other["title"], other["abstract"], "factual", 1)[0]

    def verdict(q: str, a: str) -> dict:
        return judge_verdict(messages(TEMPLATE, make_item("x", {"question": q, "answer": a, "chunk": 0}, p))[1]
                             ["content"])

    assert verdict(good["question"], good["answer"]) == {"answerable": 5, "correct": 5, "reason": verdict(
        good["question"], good["answer"])["reason"]}
    wrong = verdict(good["question"], foreign["answer"])
    assert wrong["answerable"] == 5 and wrong["correct"] <= 2 and foreign["answer"][:40] in wrong["reason"]
    off = verdict(foreign["question"], foreign["answer"])          # asks about the other paper, by its title
    assert off["answerable"] == 1 and "not this paper" in off["reason"]


@pytest.mark.parametrize(("reply", "expected"), [
    ('{"reason": "stated", "answerable": 5, "correct": 4}', (5, 4, "stated")),
    ('Here is my verdict:\n```json\n{"reason": "no", "answerable": "2", "correct": 1.0}\n```', (2, 1, "no")),
    ('<think>{"answerable": 1, "correct": 1}</think>{"Answerable": 4, "Correct": 5, "Reason": "ok"}', (4, 5, "ok")),
    ("Reason: the text says so.\nAnswerable: 5\nCorrect: 3", (5, 3, "the text says so.")),
    ('{"reason": "x", "answerable": 7, "correct": 5}', None),
    ('{"pairs": [{"question": "What", "answer": ', None),
    ("", None),
])
def test_parse_verdict_reads_json_fenced_prose_and_lines(reply, expected):
    assert parse_verdict(reply) == expected


def test_the_full_text_passage_goes_to_the_judge_for_a_full_text_pair():
    body = "\n\n".join(f"Paragraph {i} talks about topic{i} at length." for i in range(400))
    paper = {**PAPERS[0], "full_text": body}
    item = make_item("x", {"question": "q?", "answer": "It talks about topic333.", "chunk": 2}, paper)
    assert "topic333" in item.paper and "Excerpt of the full text:" in item.paper and len(item.paper) < 9000
    assert "Excerpt" not in make_item("x", {"question": "q?", "answer": "a", "chunk": 0}, paper).paper


# ---------------------------------------------------------------------------------------------------------------
# validate() with the judge

def test_the_judge_quarantines_planted_wrong_answers_and_a_rerun_sends_no_request(tmp_path):
    train = good_pairs(TRAIN_PAPERS) + planted(TRAIN_PAPERS)
    eval_ = good_pairs(EVAL_PAPERS) + planted(EVAL_PAPERS)[:1]
    seen_good = {**train[0], "question": "Briefly, what does " + train[0]["question"][0].lower() +
                 train[0]["question"][1:], "prompt_id": "paraphrase", "source_question": train[0]["question"]}
    seen_bad = {**seen_good, "question": seen_good["question"].replace("Briefly", "In short"),
                "answer": eval_[0]["answer"], "response_id": "r-seen-bad"}      # another paper's answer
    with serve_smoke_endpoint(port=0) as ep:
        p = with_judge(ep.base_url, concurrency=4)
        cache = llm.Cache(tmp_path / "judge.sqlite")
        judge = Judge(p.judge, TEMPLATE, cache, env=ENV)
        outcome = validate(train, eval_, PAPERS, p, seen=[seen_good, seen_bad], judge=judge)
        n_rows = len(train) + len(eval_) + 2
        assert ep.completions_count() == judge.requests == n_rows       # one request per row (all passed the checks)
        bad_ids = {f"train:{i}" for i in range(len(train) - len(TRAIN_PAPERS) + 1, len(train) + 1)}
        bad_ids |= {f"eval:{len(eval_)}", "seen:2"}
        assert {rid for rid, why in outcome.reasons.items() if "judge_incorrect" in why} == bad_ids
        assert set(outcome.reasons) == bad_ids
        q = next(q for q in outcome.quarantine if q["row_id"] == "seen:2")
        assert q["judge"]["correct"] <= 2 and "occur in any one sentence" in q["judge"]["reason"]
        assert q["scores"]["judge_correct"] == q["judge"]["correct"]
        assert outcome.train == train[:-len(TRAIN_PAPERS)] and outcome.eval == eval_[:-1]
        assert outcome.seen == [seen_good]
        m = outcome.metrics
        assert m["rows_quarantined"] == len(TRAIN_PAPERS) + 1                      # the gate's fail rate counts them
        assert m["row_failures"]["judge_incorrect"] == len(TRAIN_PAPERS) + 1
        assert m["seen"]["row_failures"]["judge_incorrect"] == 1
        assert m["judge"]["judge_incorrect"] == len(TRAIN_PAPERS) + 2 and m["judge"]["rows_judged"] == n_rows
        assert "judge_incorrect" in summary(outcome) and "judge: the text addresses" in summary(outcome)
        cache.close()

        cache = llm.Cache(tmp_path / "judge.sqlite")                 # a rerun: every verdict from the cache
        again = Judge(p.judge, TEMPLATE, cache, env={})                 # (no key needed: nothing to send)
        rerun = validate(train, eval_, PAPERS, p, seen=[seen_good, seen_bad], judge=again)
        cache.close()
        assert ep.completions_count() == n_rows and again.requests == 0 and again.cached == n_rows
        assert rerun.quarantine == outcome.quarantine and rerun.train == outcome.train
        # the threshold is no part of a verdict's key (a stricter one re-reads the cached scores), the model is
        item = make_item("train:1", train[0], PAPERS[0])
        strict = dataclasses.replace(p.judge, threshold=5)
        other = dataclasses.replace(p.judge, endpoint=dataclasses.replace(p.judge.endpoint, model="another"))
        assert Judge(strict, TEMPLATE, cache, env={}).key(item) == again.key(item)
        assert Judge(other, TEMPLATE, cache, env={}).key(item) != again.key(item)
    assert SECRET not in (tmp_path / "judge.sqlite").read_bytes().decode("latin-1")


def test_a_reply_without_a_verdict_is_asked_again_then_quarantined_uncached(tmp_path):
    train = good_pairs(TRAIN_PAPERS[:2])
    with serve_smoke_endpoint(port=0, faults=Faults(rate_invalid_json=1.0)) as ep:
        p = with_judge(ep.base_url, max_retries=1)
        cache = llm.Cache(tmp_path / "judge.sqlite")
        judge = Judge(p.judge, TEMPLATE, cache, env=ENV)
        outcome = validate(train, [], PAPERS, p, judge=judge)
        cache.close()
        assert ep.completions_count() == 2 * len(train) and judge.reasks == len(train)
        assert all(why == ["judge_failed"] for why in outcome.reasons.values()) and len(outcome.reasons) == len(train)
        assert "holds no verdict" in outcome.quarantine[0]["judge"]["reason"]
        with sqlite3.connect(tmp_path / "judge.sqlite") as con:               # nothing cached: a rerun asks again
            assert con.execute("SELECT COUNT(*) FROM replies").fetchone() == (0,)


def test_an_endpoint_that_keeps_failing_stops_with_one_line_and_keeps_the_verdicts(tmp_path):
    train = good_pairs(TRAIN_PAPERS[:2])
    with serve_smoke_endpoint(port=0, faults=Faults(rate_500=1.0)) as ep:
        p = with_judge(ep.base_url, max_retries=0)
        judge = Judge(p.judge, TEMPLATE, llm.Cache(tmp_path / "judge.sqlite"), env=ENV)
        with pytest.raises(TransientError, match=r"^the judge: HTTP 500 server error: .*a rerun resumes\)$"):
            validate(train, [], PAPERS, p, judge=judge)
        assert ep.completions_count() <= p.judge.concurrency     # stopped at the first failures, not one per row
    with serve_smoke_endpoint(port=0, api_key="right-key") as ep:
        p = with_judge(ep.base_url)
        judge = Judge(p.judge, TEMPLATE, llm.Cache(tmp_path / "judge2.sqlite"), env=ENV)
        with pytest.raises(ConfigError, match="rejected the API key") as e:
            validate(train, [], PAPERS, p, judge=judge)
        assert SECRET not in str(e.value)


def test_the_running_cost_guard_sends_no_request_that_could_pass_the_cap(tmp_path, monkeypatch):
    train = good_pairs(TRAIN_PAPERS[:3])
    monkeypatch.setattr(llm, "estimate", lambda text: 1)   # an estimate far below the real usage
    with serve_smoke_endpoint(port=0) as ep:
        p = with_judge(ep.base_url, concurrency=1, max_tokens=10)
        one = judge_mod.Judge(p.judge, TEMPLATE, llm.Cache(tmp_path / "probe.sqlite"), env=ENV)
        one([make_item("x", train[0], PAPERS[0])])
        cap = one.spent * 2.5                                          # room for two requests, not three
        capped = dataclasses.replace(p.judge, max_cost_usd=cap)
        judge = judge_mod.Judge(capped, TEMPLATE, llm.Cache(tmp_path / "judge.sqlite"), env=ENV)
        with pytest.raises(ConfigError, match=r"validate\.judge\.max_cost_usd .* reached"):
            validate(train, [], PAPERS, dataclasses.replace(p, judge=capped), judge=judge)
        assert judge.requests == 3 and judge.spent <= cap + one.spent  # stopped at the first request past the cap


# ---------------------------------------------------------------------------------------------------------------
# the stage

def workspace(root: Path, base_url: str, train: list, **judge) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    jp = {"endpoint": {"base_url": base_url, "model": "qrb-smoke-extractive", "api_key_env": KEY_ENV},
          "threshold": 3, "max_tokens": 300, "concurrency": 1, "timeout_s": 5, "max_retries": 1,
          "price_input_per_1m": 1.0, "price_output_per_1m": 2.0, "max_cost_usd": 1.0, **judge}
    (root / "params.yaml").write_text(yaml.safe_dump({"base": params["base"], "validate": {
        **{k: v for k, v in dataclasses.asdict(P).items() if k != "judge"}, "judge": jp}}))
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts/judge.txt").write_text(TEMPLATE)
    write_jsonl(root / "artifacts/scrape/papers.jsonl", PAPERS)
    write_jsonl(root / "artifacts/generate/train.jsonl", train)
    write_jsonl(root / "artifacts/generate/eval.jsonl", [])
    write_jsonl(root / "artifacts/generate/seen.jsonl", [])
    write_jsonl(root / "artifacts/generate/invented.jsonl", [])
    return root


def stage(ws: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, KEY_ENV: SECRET, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "stages.validate"], cwd=ws, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def cached(ws: Path) -> int:
    db = ws / "cache/validate/judge.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0


def report(ws: Path) -> dict:
    path = ws / "reports/validate.json"
    return json.loads((path if path.exists() else ws / "metrics/validate.json").read_text())


@pytest.mark.slow  # two stage processes (~1 minute on a loaded 2-core machine)
def test_the_stage_resumes_after_kill_9_without_asking_twice(tmp_path):
    train = good_pairs(TRAIN_PAPERS) + planted(TRAIN_PAPERS)
    with serve_smoke_endpoint(port=0, faults=Faults(latency_s=0.15)) as ep:
        ws = workspace(tmp_path / "ws", ep.base_url, train)
        proc = stage(ws)
        deadline = time.monotonic() + 120
        while cached(ws) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        done, sent = cached(ws), ep.completions_count()
        assert 5 <= done < len(train) and sent <= done + 1             # at most the one in flight was lost
        assert not (ws / "artifacts/validate/train.jsonl").exists()

        r = stage(ws)
        out, err = r.communicate(timeout=300)
        assert r.returncode == 0, err[-2000:]
        assert ep.completions_count() - sent == len(train) - done      # only the verdicts the kill left unasked
        j = report(ws)["judge"]
        assert (j["cached"], j["requests"], j["rows_judged"]) == (done, len(train) - done, len(train))
        assert j["judge_incorrect"] == len(TRAIN_PAPERS)
        quarantine = [json.loads(line) for line in (ws / "artifacts/validate/quarantine.jsonl").read_text()
                      .splitlines()]
        assert [q["reasons"] for q in quarantine] == [["judge_incorrect"]] * len(TRAIN_PAPERS)
        assert all(q["judge"]["reason"] for q in quarantine)
        assert "judge_incorrect" in err and "LLM judge" in err
    for path in ws.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_the_stage_refuses_a_judge_above_the_cost_cap_in_one_line(tmp_path, monkeypatch, capsys):
    from stages.validate.run import main

    train = good_pairs(TRAIN_PAPERS)
    with serve_smoke_endpoint(port=0) as ep:
        ws = workspace(tmp_path / "ws", ep.base_url, train, max_cost_usd=0.001)
        monkeypatch.chdir(ws)
        monkeypatch.setenv(KEY_ENV, SECRET)
        with pytest.raises(SystemExit) as e:
            main([])
        assert e.value.code == ConfigError.exit_code and ep.completions_count() == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("validate:")]
    assert len(lines) == 1 and "validate.judge.max_cost_usd $0.0010" in lines[0] and "no request" in lines[0]
    assert not (ws / "artifacts/validate").exists() and not (ws / "reports/data_docs").exists()
