"""The offline OpenAI-compatible smoke endpoint: wire format, extractive pairs, faults, CLI."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.generate.replies import PAIR_SCHEMA, parse_pairs
from standins.smoke import (
    FINGERPRINT,
    MODEL_ID,
    Faults,
    completion,
    extractive_pairs,
    serve_smoke_endpoint,
    split_sentences,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["factual", "results", "methods", "novelty", "definitions"]
ABSTRACT = ("Quantum error correction protects logical qubits from noise. We introduce a new decoder for the surface "
            "code based on belief propagation, i.e. message passing on the Tanner graph. Our decoder reaches a "
            "threshold of 0.9% under circuit-level noise. Compared with previous work, the decoder runs in linear "
            "time. A syndrome is defined as the outcome of the stabilizer measurements.")
TITLE = "Fast belief-propagation decoding of the surface code"


def user_message(title: str, abstract: str, focus: str, n: int = 3) -> str:
    template = (ROOT / "prompts" / f"{focus}.txt").read_text()
    paper = f"<paper>\nTitle: {title}\nDOI: 10.22331/q-2024-01-01-1\nAbstract:\n{abstract}\n</paper>"
    return template.replace("{{n}}", str(n)).replace("{{paper}}", paper)


def body(focus: str = "factual", schema: bool = True, title: str = TITLE, abstract: str = ABSTRACT) -> dict:
    b = {"model": MODEL_ID, "messages": [{"role": "system", "content": "sys"},
                                         {"role": "user", "content": user_message(title, abstract, focus)}]}
    if schema:
        b["response_format"] = {"type": "json_schema",
                                "json_schema": {"name": "qa_pairs", "strict": True, "schema": PAIR_SCHEMA}}
    return b


def post(base_url: str, payload: dict, key: str | None = "sk-test") -> tuple[int, dict, dict]:
    host, port = re.match(r"http://([^:/]+):(\d+)", base_url).groups()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload), headers=headers)
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, dict(resp.headers), data


def check_quality(pairs: list[dict], title: str, abstract: str) -> None:
    questions = [p["question"] for p in pairs]
    assert len(set(q.lower() for q in questions)) == len(questions)
    flat = " ".join(abstract.split())
    for p in pairs:
        q, a = p["question"], p["answer"]
        assert q.endswith("?") and 15 <= len(q) <= 400, q
        assert 10 <= len(a) <= 2000, a
        assert title.split()[0] in q  # names its subject
        assert not re.search(r"\bthis paper\b|\bthe text\b|\bthe authors\b", q, re.I)
        assert a in flat  # extractive: a sentence of the abstract
        # no JSON or HTML fragments (LaTeX math of the abstract, `$...$`, is the paper's own text)
        assert not re.search(r"[{}<>]|\"question\"|\"answer\"", q + re.sub(r"\$[^$]*\$", "", a))


def test_sdk_parses_replies_and_models():
    from openai import OpenAI

    with serve_smoke_endpoint(port=0) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="sk-test", max_retries=0)
        assert [m.id for m in client.models.list()] == [MODEL_ID]
        b = body("results")
        resp = client.chat.completions.create(model=b["model"], messages=b["messages"],
                                              response_format=b["response_format"])
        assert resp.model == MODEL_ID and resp.system_fingerprint == FINGERPRINT
        assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.role == "assistant"
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0
        content = json.loads(resp.choices[0].message.content)  # schema mode: plain JSON, matching the schema
        assert set(content) == {"pairs"} and len(content["pairs"]) == 3
        assert all(set(p) == {"question", "answer", "short_answer", "aliases", "evidence"} for p in content["pairs"])
        check_quality(content["pairs"], TITLE, ABSTRACT)
        assert ep.request_count == 2 and ep.completions_count() == 1


def test_deterministic_and_varies_by_prompt():
    replies = {f: json.loads(completion(body(f))["choices"][0]["message"]["content"])["pairs"] for f in PROMPTS}
    assert replies["factual"] == json.loads(completion(body("factual"))["choices"][0]["message"]["content"])["pairs"]
    assert completion(body("factual"))["id"] == completion(body("factual"))["id"]
    questions = [p["question"] for f in PROMPTS for p in replies[f]]
    assert len(set(questions)) == len(questions)  # no duplicates within the paper across prompts
    # the results prompt prefers the sentence with the number, the definitions prompt the definition
    assert any("0.9%" in p["answer"] for p in replies["results"])
    assert any("is defined as" in p["answer"] for p in replies["definitions"])


def test_without_schema_the_json_is_fenced_and_still_parseable():
    content = completion(body(schema=False))["choices"][0]["message"]["content"]
    assert content.startswith("Here are") and "```json" in content
    assert len(parse_pairs(content)) == 3


def test_sentence_splitter_keeps_abbreviations():
    assert len(split_sentences(ABSTRACT)) == 5
    assert "i.e. message passing" in split_sentences(ABSTRACT)[1]


@pytest.mark.skipif(not (ROOT / "data/corpus/quantum-papers.jsonl").exists(), reason="corpus not pulled")
def test_quality_bar_on_the_corpus():
    papers = [json.loads(line) for name in ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")
              for line in (ROOT / "data/corpus" / name).read_text().splitlines() if line.strip()]
    total = 0
    for paper in papers:
        pairs = [p for f in PROMPTS for p in extractive_pairs(paper["title"], paper["abstract"], f, 3)]
        assert pairs, paper["title"]
        check_quality(pairs, " ".join(paper["title"].replace('"', "'").split()), paper["abstract"])
        total += len(pairs)
    assert total >= 0.9 * len(papers) * 15


def test_faults_are_seeded_and_well_formed():
    faults = Faults(rate_429=0.3, rate_500=0.2, rate_invalid_json=0.2, rate_truncated=0.2, retry_after_s=0.25, seed=7)
    draws = [faults.draw(b"same body", i) for i in range(200)]
    assert draws == [faults.draw(b"same body", i) for i in range(200)]
    counts = {k: draws.count(k) for k in ("429", "500", "invalid_json", "truncated", None)}
    assert 40 <= counts["429"] <= 80 and counts[None] >= 5
    seen = set()
    with serve_smoke_endpoint(port=0, faults=faults) as ep:
        for _ in range(40):
            status, headers, data = post(ep.base_url, body())
            fault = ep.requests[-1]["fault"]
            seen.add(fault)
            if fault == "429":
                assert status == 429 and headers["Retry-After"] == "1" and headers["retry-after-ms"] == "250"
                assert data["error"]["type"] == "rate_limit_error"
            elif fault == "500":
                assert status == 500 and "error" in data
            elif fault == "invalid_json":
                assert status == 200 and parse_pairs(data["choices"][0]["message"]["content"]) == []
            elif fault == "truncated":
                assert status == 200 and data["choices"][0]["finish_reason"] == "length"
            else:
                assert status == 200 and len(parse_pairs(data["choices"][0]["message"]["content"])) == 3
        assert ep.request_count == 40
    assert seen == {"429", "500", "invalid_json", "truncated", None}


def test_stall_replies_after_the_stall():
    with serve_smoke_endpoint(port=0, faults=Faults(rate_stall=1.0, stall_s=0.3)) as ep:
        t0 = time.monotonic()
        status, _, _ = post(ep.base_url, body())
        assert status == 200 and time.monotonic() - t0 >= 0.3


def test_rejects_missing_key_and_unknown_model():
    with serve_smoke_endpoint(port=0, api_key="sk-right") as ep:
        assert post(ep.base_url, body(), key=None)[0] == 401
        assert post(ep.base_url, body(), key="sk-wrong")[0] == 401
        status, _, data = post(ep.base_url, {**body(), "model": "gpt-4-turbo"}, key="sk-right")
        assert status == 404 and data["error"]["code"] == "model_not_found"
        assert post(ep.base_url, {"model": MODEL_ID}, key="sk-right")[0] == 400


def test_cli_serves_until_killed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "standins.smoke", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "QRB_SMOKE_API_KEY": "anything"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, data = post(f"http://127.0.0.1:{port}/v1", body())
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        assert status == 200 and data["model"] == MODEL_ID
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert "NOT a language model" in out and "request #1" in out
