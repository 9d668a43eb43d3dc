"""Batch mode (`generate.mode: batch`): one round's uncached requests as one OpenAI Batch API job (more where they
exceed a job's 50,000 requests or 200 MB), at
`batch_price_factor` of the online price. `Batcher.run(units)` answers what the job can into the response cache; the
round's online pass (`Requester.run`) then finds those replies cached and sends only the rest, with its retries.

The job: a JSONL of chat-completions requests (`custom_id` = the unit's cache key, the body exactly what the online
path sends, so both get the same reply and share the cache) uploaded with `files.create(purpose="batch")`,
`batches.create(endpoint="/v1/chat/completions", completion_window="24h", metadata={"qrb_tag": ...})`, polled with
`batches.retrieve` (waits from `batch_poll_s` doubling to `batch_poll_max_s`), then its output and error files read.

Never paid twice: the job is written to the cache (table `batches`) as `submitting` before it is created and as
`open` with its id right after; a rerun resumes every open job that holds requests it still needs (a `submitting`
one is looked up by its tag in `batches.list`: the crash came between creating it and writing its id down). A
finished job's replies and its `done` mark are one transaction.

What a job did not answer is sent online, where the request's retries apply and a request failing there is recorded
in failures.jsonl with its reason: lines the job reports failed (its error file), replies that are cut off or hold no
pairs, and the rest of an expired or cancelled job. Expired leftovers go online rather than into a new job: a job
expires when the Batch API could not run it within 24 h, so a new one would likely wait as long again and may expire
too, while the online path finishes them now, within `max_cost_usd` (at the online price; usually a small tail).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from qrb import llm
from qrb.errors import ConfigError, TransientError

from .client import Attempt, Requester, judge_reply
from .units import Unit

log = logging.getLogger(__name__)

ENDPOINT = "/v1/chat/completions"
FINISHED = ("completed", "failed", "expired", "cancelled")
MAX_REQUESTS = 50_000        # the Batch API's limits per job: requests ...
MAX_BYTES = 190 * 1024 ** 2  # ... and input file size (200 MB), with a margin
LIST_LIMIT = 100  # a `submitting` job is looked for among the account's newest jobs (it was created just before)


class BatchLost(Exception):
    """The endpoint has no job by the id the cache holds (another account or endpoint): nothing to wait for."""


class Batcher:
    """Batch mode for the rounds of one run, through the `Requester`'s client, cache, params, stats and
    response_format (the online pass after each job negotiates the format as usual)."""

    def __init__(self, requester: Requester) -> None:
        self.r = requester
        self.p = requester.p

    async def call(self, what: str, fn: Any, *args: Any, recover: Any = None, **kwargs: Any) -> Any:
        """One Batch/Files API call with the request's retries on transient errors; a clear error otherwise.
        `recover()`, after a transient failure: what the failed try did anyway (the call's result), or None."""
        import openai

        hint = " (generate.mode batch needs an endpoint with the OpenAI Files and Batch API; else mode online)"
        timeout = kwargs.pop("timeout", self.p.timeout_s)
        for attempt in range(self.p.max_retries + 1):
            try:
                return await fn(*args, timeout=timeout, **kwargs)
            except (openai.APIConnectionError, openai.APIStatusError) as e:  # time-outs included
                f = llm.failure(e, self.r.secret, timeout)
                if not f.transient:
                    raise ConfigError(f"batch mode: {what}: {f.reason}" + hint) from None
            if recover is not None and (done := await recover()) is not None:
                return done
            if attempt == self.p.max_retries:
                raise TransientError(f"batch mode: {what} failed {attempt + 1} times: {f.reason}")
            self.r.stats.retries += 1
            await asyncio.sleep(max(f.retry_after or 0.0, self.r.backoff(attempt)))
        raise AssertionError("unreachable")

    async def run(self, units: list[Unit]) -> None:
        cached = self.r.cache.get_many({u.key for u in units})
        todo = {u.key: u for u in units if u.key not in cached}
        for rec in self.r.cache.open_batches():
            if todo.keys() & set(rec["keys"]):
                for k in await self.resume(rec, todo):
                    todo.pop(k, None)
        if todo and not self.r.stop_reason():
            jobs = [await self.submit(part) for part in self.parts(list(todo.values()))]
            for rec in jobs:  # all submitted first: the Batch API runs them side by side
                await self.resume(rec, todo)

    def parts(self, units: list[Unit]) -> list[list[tuple[Unit, bytes]]]:
        """The units with their JSONL lines, in jobs within the Batch API's limits (requests and file size)."""
        out: list[list[tuple[Unit, bytes]]] = [[]]
        size = 0
        for u in units:
            line = (json.dumps({"custom_id": u.key, "method": "POST", "url": ENDPOINT, "body": self.r.body(u)},
                               ensure_ascii=False) + "\n").encode()
            if out[-1] and (len(out[-1]) >= MAX_REQUESTS or size + len(line) > MAX_BYTES):
                out.append([])
                size = 0
            out[-1].append((u, line))
            size += len(line)
        return out

    async def submit(self, part: list[tuple[Unit, bytes]]) -> dict[str, Any]:
        units = [u for u, _ in part]
        keys = [u.key for u in units]
        tag = llm.key(self.p.base_url.rstrip("/"), self.p.model, sorted(keys))[:32]
        self.r.cache.put_batch(tag, keys, "submitting")
        data = b"".join(line for _, line in part)
        f = await self.call("upload of the requests", self.r.client.files.create,
                            file=(f"qrb-generate-{tag}.jsonl", data, "application/jsonl"), purpose="batch",
                            timeout=max(self.p.timeout_s, 600.0))
        b = await self.create(tag, f.id)
        self.r.cache.put_batch(tag, keys, "open", b.id, f.id)
        self.r.stats.batches_submitted += 1
        self.r.stats.batch_requests += len(units)
        log.info("generate: batch %s submitted: %d requests (%d bytes)", b.id, len(units), len(data))
        return {"tag": tag, "state": "open", "batch_id": b.id, "input_file_id": f.id, "keys": keys}

    async def create(self, tag: str, file_id: str) -> Any:
        """batches.create; a try that failed in transit may have created the job: it is looked up before the next."""
        async def created() -> Any:
            bid = await self.find(tag)
            return None if bid is None else await self.call("polling the batch", self.r.client.batches.retrieve, bid)

        return await self.call("creating the batch", self.r.client.batches.create, input_file_id=file_id,
                               endpoint=ENDPOINT, completion_window="24h", metadata={"qrb_tag": tag}, recover=created)

    async def find(self, tag: str) -> str | None:
        """The id of the job created with this tag (among the newest), or None: it never was."""
        seen = 0
        async for b in await self.call("listing batches", self.r.client.batches.list, limit=LIST_LIMIT):
            if (b.metadata or {}).get("qrb_tag") == tag:
                return b.id
            seen += 1
            if seen >= LIST_LIMIT:
                break
        return None

    async def resume(self, rec: dict[str, Any], todo: dict[str, Unit]) -> set[str]:
        """Wait for a job, keep its replies; returns the keys it held (none when it does not exist)."""
        bid = rec["batch_id"]
        if rec["state"] == "submitting":
            bid = await self.find(rec["tag"])
            if bid is None:
                log.info("generate: batch %s was never created; its requests are sent again", rec["tag"])
                self.r.cache.finish_batch(rec["tag"], "never created", [])
                return set()
            self.r.cache.put_batch(rec["tag"], rec["keys"], "open", bid, rec["input_file_id"])
            log.info("generate: found batch %s (created before the last run stopped)", bid)
        try:
            b = await self.wait(bid)
        except BatchLost:
            log.warning("generate: batch %s no longer exists at %s; its requests are sent again", bid,
                        self.p.base_url)
            self.r.cache.finish_batch(rec["tag"], "lost", [])
            return set()
        results = await self.collect(b, rec["keys"], todo)
        self.r.cache.finish_batch(rec["tag"], b.status, results)
        n_failed = sum(k in todo for k in rec["keys"]) - len(results)
        self.r.stats.batch_answered += len(results)
        self.r.stats.batch_failed += n_failed
        log.info("generate: batch %s %s: %d replies kept, %d requests left to the online path", bid, b.status,
                 len(results), n_failed)
        return set(rec["keys"])

    async def wait(self, bid: str) -> Any:
        from tqdm import tqdm

        delay = self.p.batch_poll_s
        bar = tqdm(desc=f"batch {bid}", unit="request")  # a wait of up to 24 h: the flow shows where it is
        while True:
            try:
                b = await self.call("polling the batch", self.r.client.batches.retrieve, bid)
            except ConfigError as e:
                if "HTTP 404" in str(e):
                    raise BatchLost(bid) from None
                raise
            counts = b.request_counts
            log.info("generate: batch %s %s (%s of %s done)", bid, b.status, getattr(counts, "completed", "?"),
                     getattr(counts, "total", "?"))
            bar.total, bar.n = getattr(counts, "total", None) or None, getattr(counts, "completed", 0) or 0
            bar.refresh()
            if b.status in FINISHED:
                bar.close()
                if b.status == "failed":
                    errs = [e.message for e in (getattr(b.errors, "data", None) or []) if e.message]
                    log.warning("generate: batch %s failed: %s", bid, "; ".join(errs[:3]) or "no reason given")
                return b
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.p.batch_poll_max_s)

    async def lines(self, file_id: str | None, what: str) -> list[dict[str, Any]]:
        if not file_id:
            return []
        content = await self.call(f"downloading the {what} file", self.r.client.files.content, file_id,
                                  timeout=max(self.p.timeout_s, 600.0))
        return [json.loads(x) for x in content.text.splitlines() if x.strip()]

    async def collect(self, b: Any, keys: list[str], todo: dict[str, Unit]) -> list[tuple[Unit, dict[str, Any]]]:
        """The kept replies of a finished job (billed at `batch_price_factor`); why the others were not kept."""
        from openai.types.chat import ChatCompletion

        results: list[tuple[Unit, dict[str, Any]]] = []
        reasons: dict[str, str] = {}
        for row in await self.lines(b.output_file_id, "output") + await self.lines(b.error_file_id, "error"):
            key, resp = row.get("custom_id"), row.get("response") or {}
            body = resp.get("body") or {}
            if resp.get("status_code") == 200:
                try:
                    outcome, pt, ct = judge_reply(ChatCompletion.model_validate(body), self.p)
                except ValueError as e:
                    outcome, pt, ct = Attempt(reason=f"unreadable reply: {llm.scrub(e)}"), 0, 0
                self.r.stats.batch_prompt_tokens += pt
                self.r.stats.batch_completion_tokens += ct
                if outcome.value is not None and key in todo:
                    results.append((todo[key], {**outcome.value, "batch": True}))
                    continue
                reasons[key] = outcome.reason
            else:
                status, err = resp.get("status_code"), body.get("error") or {}
                if row.get("error"):  # the request never ran (batch_expired, batch_cancelled, ...)
                    status, err = row["error"].get("code") or "failed", row["error"]
                elif status:
                    status = f"HTTP {status}"
                reasons[key] = f"{status or 'failed'}: {llm.scrub(err.get('message') or '', self.r.secret)}"
        answered = {u.key for u, _ in results}
        for key in keys:
            if key in todo and key not in answered:
                reason = reasons.get(key, f"no result in batch {b.id} ({b.status})")
                self.r.stats.errors["batch: " + llm.error_kind(reason)] += 1
        return results
