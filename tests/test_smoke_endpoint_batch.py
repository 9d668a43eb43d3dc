"""The smoke endpoint's Files and Batch API through the openai SDK: deterministic replies (the chat-completions
writer's), done after `batch_polls` polls, and the injectable faults (failed lines in an error file, expiry, a
batch that fails validation)."""

from __future__ import annotations

import json

import pytest
from openai import BadRequestError, OpenAI

from standins.smoke import MODEL_ID, Faults, completion, serve_smoke_endpoint

USER = ("Question focus: results\nWrite {n} pairs.\n<paper>\nTitle: A surface code decoder\nDOI: 10.1/x\nAbstract:\n"
        "We show that the decoder reaches a threshold of 1.1% under circuit-level noise. The decoder runs in "
        "linear time on the surface code.\n</paper>")


def lines(n: int) -> list[dict]:
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": MODEL_ID, "messages": [{"role": "user", "content": USER.replace("{n}", str(i + 1))}],
                      "temperature": 0.0, "seed": 1}} for i in range(n)]


def submit(client: OpenAI, rows: list[dict], **meta):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(data)
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata=meta or None)


def download(client: OpenAI, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_completes_at_its_nth_poll_with_the_chat_completions_replies():
    with serve_smoke_endpoint(port=0, faults=Faults(batch_polls=3)) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
        b = submit(client, lines(4), qrb_tag="t1")
        assert b.status == "validating" and b.request_counts.total == 4
        statuses = [client.batches.retrieve(b.id).status for _ in range(4)]
        assert statuses == ["in_progress", "in_progress", "completed", "completed"]
        done = client.batches.retrieve(b.id)
        assert done.error_file_id is None and done.request_counts.completed == 4
        out = download(client, done.output_file_id)
        assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(4)]
        for row, line in zip(out, lines(4)):
            want = completion(line["body"])
            assert row["response"]["status_code"] == 200
            assert row["response"]["body"]["choices"] == want["choices"] and row["response"]["body"]["id"] == want["id"]
        # listed newest first, with its metadata (how a crashed submitter finds its batch again)
        submit(client, lines(1), qrb_tag="t2")
        assert [x.metadata["qrb_tag"] for x in client.batches.list(limit=10)] == ["t2", "t1"]
        assert ep.count("POST", "/v1/batches") == 2 and ep.count("POST", "/v1/files") == 2


def test_failed_lines_expiry_and_validation_failure_are_injectable():
    with serve_smoke_endpoint(port=0, faults=Faults(batch_polls=1, batch_error_rate=0.5, seed=2)) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
        b = client.batches.retrieve(submit(client, lines(20)).id)
        ok, bad = download(client, b.output_file_id), download(client, b.error_file_id)
        assert b.status == "completed" and 3 < len(bad) < 17 and len(ok) + len(bad) == 20
        assert {r["custom_id"] for r in ok}.isdisjoint(r["custom_id"] for r in bad)
        assert all(r["response"]["status_code"] == 500 and r["response"]["body"]["error"]["message"] for r in bad)
        assert (b.request_counts.completed, b.request_counts.failed) == (len(ok), len(bad))
        # the same draw again: deterministic
        again = client.batches.retrieve(submit(client, lines(20)).id)
        assert {r["custom_id"] for r in download(client, again.error_file_id)} == {r["custom_id"] for r in bad}
    with serve_smoke_endpoint(port=0, faults=Faults(batch_polls=1, batch_expire=0.25)) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
        b = client.batches.retrieve(submit(client, lines(8)).id)
        assert b.status == "expired" and len(download(client, b.output_file_id)) == 2
        assert {r["error"]["code"] for r in download(client, b.error_file_id)} == {"batch_expired"}
    with serve_smoke_endpoint(port=0, faults=Faults(batch_polls=1, batch_fail=True)) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
        b = client.batches.retrieve(submit(client, lines(3)).id)
        assert b.status == "failed" and b.output_file_id is None and b.errors.data[0].message


def test_bad_batch_requests_are_refused():
    with serve_smoke_endpoint(port=0) as ep:
        client = OpenAI(base_url=ep.base_url, api_key="x", max_retries=0)
        with pytest.raises(BadRequestError, match="unique custom_id"):
            submit(client, lines(2) + lines(1))
        with pytest.raises(BadRequestError, match="input file"):
            client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                  completion_window="24h")
