"""Batch mode (`generate.mode: batch`) on the smoke endpoint's Files and Batch API: the same pairs as online mode,
at `batch_price_factor`; a kill during polling and a rerun create no second batch; failed and expired requests go
online (recovered) or into failures.jsonl (recorded)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from generate_helpers import KEY_ENV, MARKER, ROOT, make_workspace, outputs, read, record, run_main

from qrb.errors import ConfigError
from stages.generate.cache import ResponseCache
from standins.smoke import Faults, serve_smoke_endpoint

BATCH = {"mode": "batch", "batch_poll_s": 0.01, "batch_poll_max_s": 0.05}
ROUNDS = {"augment_variants": 3, "seen_questions": 8, "max_cost_usd": 50.0}


def batches_created(ep) -> int:
    return ep.count("POST", "/v1/batches")


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """The reference: an online run with all three rounds."""
    mp = pytest.MonkeyPatch()
    try:
        with serve_smoke_endpoint(port=0) as ep:
            ws = make_workspace(tmp_path_factory.mktemp("online") / "ws", ep.base_url, **ROUNDS)
            run_main(ws, mp)
        return {"ws": ws, "outputs": outputs(ws), "record": record(ws)}
    finally:
        mp.undo()


def test_batch_mode_gives_the_online_pairs_at_half_the_price_in_three_batches(online, tmp_path, monkeypatch, capsys):
    from flows.console import BAR

    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **ROUNDS, **BATCH)
        run_main(ws, monkeypatch)
        # each job's polling is a tqdm bar: what the flow's progress artifact and the console read
        bars = [b for b in map(BAR.search, re.split(r"[\r\n]", capsys.readouterr().err)) if b and b["desc"]]
        done = {b["desc"] for b in bars if b["desc"].startswith("batch ") and b["n"] == b["total"] != "0"}
        assert len(done) == 3, bars[-5:]
        assert ep.completions_count() == 0  # every request went through a batch
        assert batches_created(ep) == 3 and ep.count("POST", "/v1/files") == 3  # QA, augment, paraphrase in turn
        first = ep.request_count
        assert outputs(ws) == online["outputs"]
        m, ref = record(ws), online["record"]
        assert m["requests"] == ref["requests"] and m["this_run"]["batch"]["answered"] == m["requests"]
        assert m["prompt_tokens"] == ref["prompt_tokens"] and m["completion_tokens"] == ref["completion_tokens"]
        assert m["cost_usd"] == pytest.approx(0.5 * ref["cost_usd"], rel=1e-4)
        assert m["this_run"]["cost_usd"] == pytest.approx(m["cost_usd"], rel=1e-4)
        assert {k: v["answered_by_batch"] for k, v in m["requests_by_kind"].items()} == \
               {k: v["requests"] for k, v in m["requests_by_kind"].items()}
        # a rerun: everything is cached, nothing is sent, the outputs are the same
        run_main(ws, monkeypatch)
        assert ep.request_count == first and outputs(ws) == online["outputs"]


def test_a_round_past_the_batch_limits_goes_as_several_jobs(online, tmp_path, monkeypatch):
    import stages.generate.batch as batch

    monkeypatch.setattr(batch, "MAX_REQUESTS", 50)
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **ROUNDS, **BATCH)
        run_main(ws, monkeypatch)
        m = record(ws)
        jobs = sum(-(-k["requests"] // 50) for k in m["requests_by_kind"].values())
        assert batches_created(ep) == m["this_run"]["batch"]["submitted"] == jobs > 3
        assert ep.completions_count() == 0 and outputs(ws) == online["outputs"]


def test_online_and_batch_share_the_cache(online, monkeypatch):
    with serve_smoke_endpoint(port=0) as ep:
        params = (online["ws"] / "params.yaml").read_text()
        (online["ws"] / "params.yaml").write_text(re.sub(r"mode: online", "mode: batch", params))
        try:
            run_main(online["ws"], monkeypatch)
        finally:
            (online["ws"] / "params.yaml").write_text(params)
        assert ep.request_count == 0 and outputs(online["ws"]) == online["outputs"]


def test_dry_run_prices_the_batch_at_the_batch_factor(tmp_path, monkeypatch, capsys):
    def estimate(**over) -> float:
        ws = make_workspace(tmp_path / str(len(over)), "http://127.0.0.1:9/v1", **ROUNDS, **over)
        run_main(ws, monkeypatch, "--dry-run")
        out = capsys.readouterr().out
        assert not (ws / "cache").exists()
        return float(re.search(r"estimated \d+ prompt \+ \d+ completion tokens = \$([\d.]+)", out).group(1)), out

    online_usd, _ = estimate()
    batch_usd, out = estimate(**BATCH, batch_price_factor=0.5)
    assert "mode batch" in out and batch_usd == pytest.approx(online_usd / 2, rel=1e-3) and online_usd > 0


def test_failed_lines_are_recovered_online_and_what_fails_there_is_recorded(online, tmp_path, monkeypatch):
    with serve_smoke_endpoint(port=0, faults=Faults(batch_error_rate=0.3, seed=3)) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **ROUNDS, **BATCH)
        run_main(ws, monkeypatch)
        m = record(ws)["this_run"]
        failed = m["batch"]["failed"]
        assert failed > 10 and ep.completions_count() == failed  # each failed line: one online request
        assert m["errors"].get("batch: HTTP 500") == failed
        assert outputs(ws) == online["outputs"]  # recovered
    # 400s: the batch line fails, and so does the online request (no retry fixes it): recorded with the reason
    with serve_smoke_endpoint(port=0, faults=Faults(rate_400=0.2, seed=5)) as ep:
        ws = make_workspace(tmp_path / "ws400", ep.base_url, **BATCH)
        run_main(ws, monkeypatch)
        m = record(ws)
        failures = read(ws / "artifacts/generate/failures.jsonl")
        sent_failed = [f for f in failures if f["prompt_id"]]
        assert m["this_run"]["batch"]["failed"] == ep.completions_count() > 0
        assert sent_failed and all(f["reason"].startswith("HTTP 400 bad request") and f["attempts"] == 1
                                   for f in sent_failed)
        assert m["requests_answered"] + m["requests_failed"] == m["requests"]
        assert m["requests_failed"] == len(sent_failed) < m["this_run"]["batch"]["failed"]  # most passed online


@pytest.mark.parametrize("faults", [Faults(batch_expire=0.4), Faults(batch_fail=True)], ids=["expired", "failed"])
def test_an_expired_or_failed_batch_keeps_what_it_did_and_sends_the_rest_online(faults, online, tmp_path,
                                                                                  monkeypatch):
    with serve_smoke_endpoint(port=0, faults=faults) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **ROUNDS, **BATCH)
        run_main(ws, monkeypatch)
        m = record(ws)
        assert batches_created(ep) == 3 and outputs(ws) == online["outputs"]
        b = m["this_run"]["batch"]
        assert b["answered"] + b["failed"] == b["requests"] == m["requests"]
        assert ep.completions_count() == b["failed"] > 0
        if faults.batch_fail:
            assert b["answered"] == 0
        else:  # 40% of each batch's lines done before it expired
            qa = m["requests_by_kind"]["qa"]
            assert qa["answered_by_batch"] == int(qa["requests"] * 0.4)
            assert m["this_run"]["errors"] == {"batch: batch_expired": b["failed"]}


def test_a_crash_between_creating_a_batch_and_saving_its_id_finds_it_again(tmp_path, monkeypatch):
    calls = []
    real = ResponseCache.put_batch

    def crash_once(self, tag, keys, state, *a, **k):
        if state == "open" and not calls:
            calls.append(tag)
            raise KeyboardInterrupt("killed after batches.create")
        return real(self, tag, keys, state, *a, **k)

    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **BATCH)
        monkeypatch.setattr(ResponseCache, "put_batch", crash_once)
        with pytest.raises(KeyboardInterrupt):
            run_main(ws, monkeypatch)
        assert batches_created(ep) == 1
        run_main(ws, monkeypatch)
        assert batches_created(ep) == 1 and ep.count("GET", "/v1/batches") == 1 and ep.completions_count() == 0
        assert read(ws / "artifacts/generate/train.jsonl")


def test_kill_9_while_polling_then_rerun_submits_no_second_batch(tmp_path):
    # polls at 0, 0.2, 0.6, 1.0, ... s: the batch is done at the 8th poll, ~2.6 s in; the kill comes at the 2nd
    with serve_smoke_endpoint(port=0, faults=Faults(batch_polls=8)) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, mode="batch", batch_poll_s=0.2, batch_poll_max_s=0.4)
        env = {**os.environ, "PYTHONPATH": str(ROOT), KEY_ENV: MARKER}
        proc = subprocess.Popen([sys.executable, "-m", "stages.generate"], cwd=ws, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        polls = lambda: sum(r["method"] == "GET" and r["path"].startswith("/v1/batches/") for r in ep.requests)  # noqa: E731
        deadline = time.monotonic() + 60
        while polls() < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        assert batches_created(ep) == 1 and not (ws / "artifacts/generate/train.jsonl").exists()
        rerun = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=ws, env=env, capture_output=True,
                               text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert batches_created(ep) == 1 and ep.count("POST", "/v1/files") == 1 and ep.completions_count() == 0
        m = record(ws)["this_run"]
        assert m["batch"]["submitted"] == 0 and m["api_requests"] == 0 and m["batch"]["answered"] == record(ws)["requests"]
        assert read(ws / "artifacts/generate/train.jsonl")


def test_an_endpoint_without_a_batch_api_is_a_clear_error(tmp_path, monkeypatch, capsys):
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url.replace("/v1", "/nobatch/v1"), **BATCH)
        with pytest.raises(SystemExit) as e:
            run_main(ws, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == ConfigError.exit_code and MARKER not in err
    assert re.fullmatch(r"generate: batch mode: upload of the requests: HTTP 404 .*mode online.*", err), err


def test_a_create_that_times_out_after_the_job_was_made_is_not_sent_twice(tmp_path, monkeypatch):
    import httpx2
    import openai
    from openai.resources.batches import AsyncBatches

    real, lost = AsyncBatches.create, []

    async def create_then_time_out(self, **kwargs):
        b = await real(self, **kwargs)
        if not lost:
            lost.append(b.id)
            raise openai.APITimeoutError(request=httpx2.Request("POST", "http://x/v1/batches"))
        return b

    monkeypatch.setattr(AsyncBatches, "create", create_then_time_out)
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, **BATCH)
        run_main(ws, monkeypatch)
        assert lost and batches_created(ep) == 1 and ep.completions_count() == 0
        assert record(ws)["this_run"]["batch"]["answered"] == record(ws)["requests"]
