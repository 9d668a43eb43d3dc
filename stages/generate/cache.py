"""The response cache: SQLite, one durable commit per response, so a rerun or a resume after `kill -9` repeats no
request that had been answered (the key is `Unit.key`: endpoint, model, template, paper content, sampling).

Batch mode keeps its jobs here too (table `batches`: the keys a batch holds, its id, its state), written before the
job is created and again once it exists, so a rerun resumes a batch instead of paying for it twice; a finished
batch's replies land in `responses` in the same transaction that marks it done."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

from qrb import llm

from .units import Unit


class ResponseCache(llm.Cache):
    """The layer's reply cache (table `responses`). During a run, one writer thread owns the writes and commits them
    in groups (all replies that arrived during the previous fsync), so fsyncs neither stall the event loop nor
    serialise the requests; a reply counts as done only once its commit has returned."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "responses")
        # state: submitting (no id yet: a crash here leaves a job to look up by tag), open, done
        self.db.execute("CREATE TABLE IF NOT EXISTS batches (tag TEXT PRIMARY KEY, created REAL NOT NULL, "
                        "state TEXT NOT NULL, batch_id TEXT, input_file_id TEXT, status TEXT, keys TEXT NOT NULL)")
        self.db.commit()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def open_batches(self) -> list[dict[str, Any]]:
        """The batch jobs not done yet, oldest first: {tag, state, batch_id, input_file_id, keys}."""
        rows = self.db.execute("SELECT tag, state, batch_id, input_file_id, keys FROM batches WHERE state != 'done' "
                               "ORDER BY created")
        return [{"tag": t, "state": s, "batch_id": b, "input_file_id": f, "keys": json.loads(k)}
                for t, s, b, f, k in rows]

    def put_batch(self, tag: str, keys: list[str], state: str, batch_id: str | None = None,
                  input_file_id: str | None = None) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?, ?, NULL, ?)",
                            (tag, time.time(), state, batch_id, input_file_id, json.dumps(keys)))

    def finish_batch(self, tag: str, status: str, results: list[tuple[Unit, dict[str, Any]]]) -> None:
        """Store a finished batch's replies and mark it done, in one transaction."""
        with self.db:
            self.write((u.key, v) for u, v in results)
            self.db.execute("UPDATE batches SET state = 'done', status = ? WHERE tag = ?", (status, tag))

    def _writer(self) -> None:
        while True:
            batch = [self.queue.get()]
            while not self.queue.empty():  # this thread is the only reader: what is there stays there
                batch.append(self.queue.get_nowait())
            items = [b for b in batch if b is not None]
            error: BaseException | None = None
            if items:
                try:
                    self.write((u.key, v) for u, v, _, _ in items)
                    self.db.commit()
                except BaseException as e:  # handed to the waiting requests
                    error = e
            for _, _, loop, fut in items:
                try:
                    loop.call_soon_threadsafe(_settle, fut, error)
                except RuntimeError:  # the run was interrupted and its loop closed; the rows are committed
                    pass
            if len(items) < len(batch):
                return

    async def aput(self, unit: Unit, value: dict[str, Any]) -> None:
        """Store a reply; returns once its commit has returned (raises what the commit raised)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._writer, name="generate-cache", daemon=True)
            self.thread.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((unit, value, loop, fut))
        await fut

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        super().close()


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        fut.set_exception(error) if error else fut.set_result(None)
