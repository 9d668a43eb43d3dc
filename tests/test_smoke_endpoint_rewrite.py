"""The smoke endpoint's augment and paraphrase answers (`Task: augment` / `Task: paraphrase` prompts), and its
fault modes for the generate stage's fallbacks: a server that refuses a response_format, a bad request."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from stages.generate.facts import fact_block
from stages.generate.replies import PAIR_SCHEMA, parse_pairs
from standins.smoke import MODEL_ID, Faults, completion, extractive_pairs, serve_smoke_endpoint
from standins.smoke.rewriter import AUGMENT_STEMS, PARAPHRASE_STEMS
from standins.smoke.writer import _STEMS

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = (ROOT / "prompts/system.txt").read_text()
TITLE = "Fast belief-propagation decoding of the surface code"
FACT = {"doi": "10.22331/q-2024-01-01-1", "title": TITLE, "published": "2024-01-01", "chunk": 0,
        "fact_id": "0123456789abcdef",
        "question": f"What result does the paper \"{TITLE}\" report concerning a threshold?",
        "answer": "We show that our BP+OSD decoder reaches a threshold of 0.9% under circuit-level noise with "
                  "Google's Sycamore layout."}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "qa_pairs", "strict": True, "schema": PAIR_SCHEMA}}


def body(task: str, fact: dict = FACT, n: int = 4, asked: list[str] | None = None, fmt: dict | None = SCHEMA) -> dict:
    template = (ROOT / "prompts" / f"{task}.txt").read_text()
    block = fact_block(fact, asked if task == "paraphrase" else None)
    user = template.replace("{{n}}", str(n)).replace("{{pair}}", block)
    b = {"model": MODEL_ID, "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]}
    return {**b, "response_format": fmt} if fmt else b


def words(text: str) -> set[str]:
    return set(re.findall(r"[^\W_]+", text.lower()))


def jaccard(a: str, b: str) -> float:
    return len(words(a) & words(b)) / len(words(a) | words(b))


def facts_of(text: str) -> set[str]:
    """Numbers, acronyms and capitalised names: what a rewording must keep."""
    return set(re.findall(r"\d+(?:\.\d+)?%?|\b[A-Z][\w+\-']*[A-Z0-9][\w+\-']*\b|\b[A-Z][a-z]+'s\b", text))


def qa_wordings(question: str, title: str) -> bool:
    """Whether a question is worded by one of the QA stems (any key phrase)."""
    for stems in _STEMS.values():
        for stem in stems:
            pattern = re.escape(stem).replace(re.escape("{t}"), re.escape(title)).replace(re.escape("{k}"), ".+")
            if re.fullmatch(pattern, question):
                return True
    return False


def test_augment_round_trip_k_variants_distinct_wordings_facts_kept():
    from openai import OpenAI

    with serve_smoke_endpoint(port=0) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="sk-test", max_retries=0)
        b = body("augment", n=4)
        resp = client.chat.completions.create(model=MODEL_ID, messages=b["messages"], response_format=SCHEMA)
    variants = json.loads(resp.choices[0].message.content)["pairs"]
    assert len(variants) == 4 and resp.model == MODEL_ID
    questions = [v["question"] for v in variants]
    assert len({q.lower() for q in questions + [FACT["question"]]}) == 5  # distinct from each other and the original
    assert not any(qa_wordings(q, TITLE) for q in questions)  # no QA stem wording
    for v in variants:
        assert v["question"].endswith("?") and TITLE in v["question"]
        assert facts_of(FACT["answer"]) <= facts_of(v["answer"]), v["answer"]  # 0.9%, BP+OSD, Google's kept
    # 2 of every 5 pairs of the fact have a reworded answer: variants 2 and 4 here, the others as written
    reworded = [i + 1 for i, v in enumerate(variants) if v["answer"] != FACT["answer"]]
    assert reworded == [2, 4]
    assert variants[1]["answer"].startswith("The paper reports that ")
    assert variants[3]["answer"].startswith(f'In "{TITLE}", ')
    assert not re.search(r"\b[Ww]e\b|\b[Oo]ur\b", variants[1]["answer"])  # third person
    assert completion(body("augment", n=4))["choices"] == completion(body("augment", n=4))["choices"]  # determinism


def test_augment_fenced_without_schema_and_many_variants():
    content = completion(body("augment", n=9, fmt=None))["choices"][0]["message"]["content"]
    assert "```json" in content
    variants = parse_pairs(content)
    assert len(variants) == 9 and len({v["question"] for v in variants}) == 9
    assert sum(v["answer"] != FACT["answer"] for v in variants) == 4  # variants 2, 4, 7, 9


def test_paraphrase_round_trip_new_wording_naming_title_and_phrase():
    asked = [FACT["question"]] + [v["question"] for v in parse_pairs(
        completion(body("augment", n=4))["choices"][0]["message"]["content"])]
    reply = json.loads(completion(body("paraphrase", asked=asked))["choices"][0]["message"]["content"])
    (pair,) = reply["pairs"]
    q = pair["question"]
    assert pair["answer"] == FACT["answer"] and q.endswith("?") and TITLE in q
    assert q not in asked and not qa_wordings(q, TITLE)
    assert max(jaccard(q, a) for a in asked) < 0.6
    phrase = q.replace(TITLE, "")
    assert words(phrase) & (words(FACT["answer"]) - words(" ".join(asked)))  # names the fact anew


def test_paraphrase_stems_use_no_wording_of_the_qa_or_augment_stems():
    stem_words = set().union(*(words(s) for group in _STEMS.values() for s in group),
                             *(words(s) for s in AUGMENT_STEMS)) - {"t", "k"}
    function_words = {"the", "by", "to", "of", "do", "give"}
    for stem in PARAPHRASE_STEMS:
        assert words(stem) & stem_words <= function_words, stem


@pytest.mark.skipif(not (ROOT / "data/corpus/quantum-papers.jsonl").exists(), reason="corpus not pulled")
def test_on_the_corpus_variants_keep_facts_and_seen_questions_are_new():
    papers = [json.loads(line) for name in ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")
              for line in (ROOT / "data/corpus" / name).read_text().splitlines() if line.strip()]
    total = kept = 0
    for paper in papers:
        title = " ".join(paper["title"].replace('"', "'").split())
        for pair in extractive_pairs(paper["title"], paper["abstract"], "results", 3):
            fact = {**FACT, "title": paper["title"], "question": pair["question"], "answer": pair["answer"]}
            variants = parse_pairs(completion(body("augment", fact, n=4))["choices"][0]["message"]["content"])
            assert len(variants) == 4 and len({v["question"] for v in variants} | {pair["question"]}) == 5
            assert all(set(re.findall(r"\d+(?:\.\d+)?", pair["answer"])) <= set(re.findall(r"\d+(?:\.\d+)?",
                                                                                           v["answer"]))
                       for v in variants)
            asked = [pair["question"]] + [v["question"] for v in variants]
            q = parse_pairs(completion(body("paraphrase", fact, asked=asked))["choices"][0]["message"]["content"])
            q = q[0]["question"]
            assert title[:20] in q and q not in asked
            total += 1
            kept += max(jaccard(q, a) for a in asked) < 0.6
    assert total >= 50 and kept >= 0.85 * total, (kept, total)


def post(base_url: str, payload: dict) -> tuple[int, dict]:
    import http.client

    host, port = re.match(r"http://([^:/]+):(\d+)", base_url).groups()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(payload),
                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test"})
    resp = conn.getresponse()
    data = json.loads(resp.read() or b"{}")
    conn.close()
    return resp.status, data


@pytest.mark.parametrize("status", [400, 422, 500])
def test_refuses_a_response_format_with_the_given_status_and_message(status):
    faults = Faults(refuse_formats=("json_schema",), refuse_status=status)
    with serve_smoke_endpoint(port=0, faults=faults) as ep:
        code, data = post(ep.base_url, body("augment"))
        assert code == status and "Input should be 'text' or 'json_object'" in data["error"]["message"]
        code, data = post(ep.base_url, body("augment", fmt={"type": "json_object"}))
        assert code == 200 and len(json.loads(data["choices"][0]["message"]["content"])["pairs"]) == 4
        assert post(ep.base_url, body("augment", fmt=None))[0] == 200


def test_bad_request_fault_and_cli_flags():
    with serve_smoke_endpoint(port=0, faults=Faults(rate_400=1.0)) as ep:
        code, data = post(ep.base_url, body("augment"))
    assert code == 400 and "max_tokens" in data["error"]["message"]
    out = subprocess.run([sys.executable, "-m", "standins.smoke", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--refuse-format" in out and "--refuse-status" in out and "--rate-400" in out
