"""Generate against a faulty endpoint: one that refuses `response_format: json_schema` (400, 422 or 500), the circuit
breaker (the same error on K requests in a row stops the run with the server's message), 0 pairs is a failure, and
the eval split capped by a share of papers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket

import pytest
from generate_helpers import MARKER, ROOT, ScriptedClient, fake_papers, make_workspace, read, recipe, reply, run_main

from qrb.errors import EXIT_CONFIG, EXIT_DATA, EXIT_TRANSIENT
from stages.generate.assemble import split_by_paper
from stages.generate.cache import ResponseCache
from stages.generate.client import Requester
from stages.generate.run import load_templates
from stages.generate.units import build_units
from standins.smoke import Faults, serve_smoke_endpoint

GOOD = '{"pairs": [{"question": "What is A?", "answer": "A is a."}]}'


def status_error(status: int, message: str):
    import httpx2
    import openai

    response = httpx2.Response(status, request=httpx2.Request("POST", "http://x/v1/chat/completions"))
    cls = {400: openai.BadRequestError, 422: openai.UnprocessableEntityError, 500: openai.InternalServerError}[status]
    return cls(message, body={"error": {"message": message}}, response=response)


def units_for(p, n_papers: int = 1):
    system, templates = load_templates(p.prompts, ROOT / "prompts")
    return build_units(fake_papers()[:n_papers], templates, system, p, 1)[0]


def stage_error(capsys) -> str:
    """The one line the stage printed last on stderr (after any progress bar)."""
    return capsys.readouterr().err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------- response_format

@pytest.mark.parametrize("status", [400, 422, 500])
def test_json_schema_refused_with_any_status_is_negotiated_once_for_the_run(tmp_path, monkeypatch, status):
    faults = Faults(refuse_formats=("json_schema",), refuse_status=status)
    with serve_smoke_endpoint(port=0, faults=faults) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:6], concurrency=8, eval_size=10,
                            eval_max_paper_share=0.5)
        run_main(ws, monkeypatch)
        formats = [r["response_format"] for r in ep.requests if r["path"].endswith("/chat/completions")]
    m = json.loads((ws / "reports/generate.json").read_text())
    # negotiated once: only the requests in flight when the first refusal came back were sent with json_schema
    assert 1 <= formats.count("json_schema") <= 8 and formats[-1] == "json_object"
    assert formats.count("json_object") == m["requests"] == 30  # each request answered once: no retry burnt
    assert m["this_run"]["response_format"] == "json_object" and m["this_run"]["retries"] == 0
    (refusal,) = m["this_run"]["response_format_refusals"]
    assert refusal["response_format"] == "json_schema" and f"HTTP {status}" in refusal["reason"]
    assert "Input should be 'text' or 'json_object'" in refusal["reason"]  # the server's own message
    assert read(ws / "artifacts/generate/train.jsonl") and not read(ws / "artifacts/generate/failures.jsonl")


def test_json_object_refused_too_falls_back_to_instructions_only(tmp_path, monkeypatch):
    faults = Faults(refuse_formats=("json_schema", "json_object"), refuse_status=422,
                    refuse_message="response_format is not supported by this server")
    with serve_smoke_endpoint(port=0, faults=faults) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:6], eval_size=10,
                            eval_max_paper_share=0.5)
        run_main(ws, monkeypatch)
        formats = [r["response_format"] for r in ep.requests]
    m = json.loads((ws / "reports/generate.json").read_text())
    assert formats.count("json_schema") <= 8 and formats.count("json_object") <= 8  # the in-flight ones only (8)
    assert formats.count(None) == m["requests"] and formats[-1] is None
    assert m["this_run"]["response_format"] == "none"
    assert [r["response_format"] for r in m["this_run"]["response_format_refusals"]] == ["json_schema",
                                                                                          "json_object"]
    assert read(ws / "artifacts/generate/train.jsonl")  # the fenced JSON of plain replies is parsed


def test_a_bare_refusal_message_naming_json_object_counts_too(tmp_path):
    p = recipe(prompts=["factual"])
    units = units_for(p)
    client = ScriptedClient(status_error(500, "Input should be 'text' or 'json_object'"), reply(GOOD))
    cache = ResponseCache(tmp_path / "responses.sqlite")
    requester = Requester(p, 1, client, cache)
    responses, failures, stats = asyncio.run(requester.run(units))
    cache.close()
    assert units[0].key in responses and not failures and stats.retries == 0
    assert [c["response_format"]["type"] for c in client.calls] == ["json_schema", "json_object"]


def test_a_server_error_keeps_the_servers_message_in_the_reason(tmp_path):
    p = recipe(prompts=["factual"], max_retries=1, backoff_base_s=0.0, backoff_max_s=0.0)
    units = units_for(p)
    client = ScriptedClient(*[status_error(500, "CUDA out of memory on worker 3")] * 2)
    cache = ResponseCache(tmp_path / "responses.sqlite")
    _, failures, stats = asyncio.run(Requester(p, 1, client, cache).run(units))
    cache.close()
    assert failures[0]["reason"].startswith("HTTP 500 server error: ") and "CUDA out of memory" in failures[0]["reason"]
    assert stats.errors == {"HTTP 500 server error": 2}  # counted under the status, the detail aside


# ------------------------------------------------------------------------------------------- circuit breaker

def test_the_same_bad_request_k_times_in_a_row_stops_the_run_with_the_servers_message(tmp_path, monkeypatch,
                                                                                       capsys):
    with serve_smoke_endpoint(port=0, faults=Faults(rate_400=1.0)) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, concurrency=4, max_consecutive_failures=5)
        with pytest.raises(SystemExit) as e:
            run_main(ws, monkeypatch)
        sent = ep.completions_count()
    err = stage_error(capsys)
    assert e.value.code == EXIT_CONFIG and err.startswith("generate: 5 requests in a row failed")
    assert "Invalid 'max_tokens'" in err and MARKER not in err and "outputs left as they were" in err
    assert sent <= 5 + 4  # K, plus what was in flight: not every retry of every paper (120 requests here)
    assert not (ws / "artifacts/generate").exists()


def test_an_endpoint_that_is_down_stops_the_run_as_transient(tmp_path, monkeypatch, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once the socket is closed
    ws = make_workspace(tmp_path / "ws", f"http://127.0.0.1:{port}/v1", max_retries=1, max_consecutive_failures=3)
    with pytest.raises(SystemExit) as e:
        run_main(ws, monkeypatch)
    err = stage_error(capsys)
    assert e.value.code == EXIT_TRANSIENT and "6 attempts in a row" in err and "connection error" in err
    assert "down or keeps failing" in err and MARKER not in err and not (ws / "artifacts/generate").exists()


def test_an_endpoint_that_keeps_failing_with_500_stops_the_run_as_transient(tmp_path, monkeypatch, capsys):
    with serve_smoke_endpoint(port=0, faults=Faults(rate_500=1.0)) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, max_retries=2, concurrency=2, max_consecutive_failures=4)
        with pytest.raises(SystemExit) as e:
            run_main(ws, monkeypatch)
        sent = ep.completions_count()
    err = stage_error(capsys)
    assert e.value.code == EXIT_TRANSIENT and "Internal server error (injected" in err
    assert "12 attempts in a row" in err  # K=4 requests' worth of attempts (1 + 2 retries each)
    assert sent <= 4 * 3 + 2  # not one attempt of each of the 120 requests, let alone all their retries


def test_scattered_failures_do_not_trip_the_breaker(tmp_path):
    p = recipe(prompts=["factual"], max_retries=0, max_consecutive_failures=2)
    units = units_for(p, 4)
    bad = status_error(400, "bad")
    client = ScriptedClient(bad, reply(GOOD), bad, reply(GOOD))  # never twice in a row
    cache = ResponseCache(tmp_path / "responses.sqlite")
    responses, failures, _ = asyncio.run(Requester(p, 1, client, cache).run(units))
    cache.close()
    assert len(responses) == 2 and len(failures) == 2


# ------------------------------------------------------------------------------------------- 0 pairs, eval cap

def test_zero_pairs_is_a_data_error_and_leaves_the_outputs_as_they_were(tmp_path, monkeypatch, capsys):
    with serve_smoke_endpoint(port=0, faults=Faults(rate_invalid_json=1.0)) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:3], max_retries=1,
                            backoff_base_s=0.0, backoff_max_s=0.0, max_consecutive_failures=1000)
        out = ws / "artifacts/generate"
        out.mkdir(parents=True)
        (out / "train.jsonl").write_text("the previous run's pairs\n")
        with pytest.raises(SystemExit) as e:
            run_main(ws, monkeypatch)
    err = stage_error(capsys)
    assert e.value.code == EXIT_DATA and err.startswith("generate: 0 pairs from 3 papers (15 of 15 requests failed")
    assert "reply is not valid JSON" in err and "outputs left as they were" in err
    assert (out / "train.jsonl").read_text() == "the previous run's pairs\n" and not (out / "eval.jsonl").exists()
    assert not (ws / "metrics/generate.json").exists()


def test_papers_without_text_give_zero_pairs_and_a_data_error(tmp_path, monkeypatch, capsys):
    papers = [{**p, "abstract": ""} for p in fake_papers()[:3]]
    ws = make_workspace(tmp_path / "ws", "http://127.0.0.1:9/v1", papers=papers)
    with pytest.raises(SystemExit) as e:
        run_main(ws, monkeypatch)
    err = stage_error(capsys)
    assert e.value.code == EXIT_DATA and "0 pairs from 3 papers" in err and "no abstract or text" in err


def test_eval_split_is_capped_by_a_share_of_papers():
    # a server that writes few distinct pairs: one paper with many, the others with one each
    rows = [{"doi": "big", "question": f"q{j}"} for j in range(42)]
    rows += [{"doi": f"p{i}", "question": "only"} for i in range(9)]
    uncapped = split_by_paper(rows, 40, seed=0)
    capped = split_by_paper(rows, 40, seed=0, max_paper_share=0.2)
    assert len(capped[1]) <= 40 and len({r["doi"] for r in capped[1]}) <= 2
    assert {r["doi"] for r in capped[0]} >= {f"p{i}" for i in range(9)} - {r["doi"] for r in capped[1]}
    assert len({r["doi"] for r in uncapped[1]}) >= len({r["doi"] for r in capped[1]})
    many = [{"doi": f"d{i}", "question": f"q{i}-{j}"} for i in range(10) for j in range(10)]
    train, evals, flag = split_by_paper(many, 50, seed=1, max_paper_share=0.2)
    assert flag and len({r["doi"] for r in evals}) == 2 and len(evals) == 20 and len(train) == 80
    assert not split_by_paper(many, 20, seed=1, max_paper_share=0.2)[2]  # the share does not bind


def test_the_stage_warns_and_records_when_the_eval_cap_binds(tmp_path, monkeypatch, caplog):
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:10], eval_size=60,
                            eval_max_paper_share=0.2)
        with caplog.at_level(logging.WARNING, logger="stages.generate"):
            run_main(ws, monkeypatch)
    m = json.loads((ws / "reports/generate.json").read_text())
    assert m["eval_capped"] and m["eval_papers"] <= m["eval_max_papers"] == int(0.2 * m["papers_with_pairs"])
    assert any("eval_max_paper_share" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_the_breakers_message_never_carries_the_key_even_when_the_server_echoes_it(tmp_path):
    p = recipe(prompts=["factual"], max_retries=0, max_consecutive_failures=1)
    units = units_for(p)
    echo = status_error(400, "x" * 292 + MARKER)  # the key across the 300-character cut of a reason
    cache = ResponseCache(tmp_path / "responses.sqlite")
    with pytest.raises(Exception) as e:
        asyncio.run(Requester(p, 1, ScriptedClient(echo), cache, secret=MARKER).run(units))
    cache.close()
    assert "requests in a row" in str(e.value) and MARKER[:8] not in str(e.value)
