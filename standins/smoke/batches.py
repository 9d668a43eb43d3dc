"""The smoke endpoint's Files and Batch API (what generate's batch mode uses), in memory: `POST /v1/files`
(multipart, purpose `batch`), `GET /v1/files/<id>/content`, `POST /v1/batches`, `GET /v1/batches[/<id>]`,
`POST /v1/batches/<id>/cancel`.

Deterministic: a batch is `validating` when created, `in_progress` from its first poll, and done at its
`batch_polls`-th poll, each line answered by `completions.completion`; as OpenAI does, the replies go to an output
file and the failed lines to an error file. `Faults` inject `batch_error_rate` (seeded failed lines),
`batch_expire` (only that share done, in file order; the rest `batch_expired`), `batch_fail` (no output at all), and
the per-request faults, drawn per line.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json
import math
import threading
import time
from typing import Any

from .completions import MODEL_ID, completion, error_body

ENDPOINT = "/v1/chat/completions"
EXPIRED = {"code": "batch_expired", "message": "This request could not be executed before the completion window "
                                               "expired (injected by the smoke endpoint)."}


def form_parts(content_type: str, raw: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body: field name -> (filename, bytes)."""
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in msg.iter_parts() if msg.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


class BatchStore:
    """The files and batches one smoke endpoint holds; `handle` answers one request as (status, body)."""

    def __init__(self, faults: Any) -> None:
        self.faults = faults
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def handle(self, method: str, path: str, query: dict[str, str], raw: bytes, content_type: str
               ) -> tuple[int, dict[str, Any] | bytes]:
        parts = [s for s in path.removeprefix("/v1/").split("/") if s]
        with self.lock:
            if parts == ["files"] and method == "POST":
                return self.upload(content_type, raw)
            if len(parts) == 3 and parts[0] == "files" and parts[2] == "content" and method == "GET":
                f = self.files.get(parts[1])
                return (200, f["data"]) if f else (404, error_body(f"No such file: {parts[1]}"))
            if parts == ["batches"] and method == "POST":
                return self.create(raw)
            if parts == ["batches"] and method == "GET":
                return self.listing(query)
            if len(parts) == 2 and parts[0] == "batches" and method == "GET":
                return self.poll(parts[1])
            if len(parts) == 3 and parts[0] == "batches" and parts[2] == "cancel" and method == "POST":
                b = self.batches.get(parts[1])
                if b is None:
                    return 404, error_body(f"No such batch: {parts[1]}")
                if b["status"] in ("validating", "in_progress"):
                    self._finish(b, "cancelled")
                return 200, self.public(b)
        return 404, error_body(f"Unknown route {method} {path}")

    # -- files --------------------------------------------------------------------------------------------------
    def _file(self, data: bytes, purpose: str, filename: str) -> dict[str, Any]:
        fid = f"file-smoke-{hashlib.sha256(data + purpose.encode()).hexdigest()[:24]}-{len(self.files)}"
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                           "filename": filename, "purpose": purpose, "status": "processed", "data": data}
        return self.files[fid]

    def upload(self, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        fields = form_parts(content_type, raw)
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields or purpose != "batch":
            return 400, error_body("Expected a multipart upload with `file` and purpose `batch`.")
        name, data = fields["file"]
        f = self._file(data, purpose, name or "upload.jsonl")
        return 200, {k: v for k, v in f.items() if k != "data"}

    # -- batches ------------------------------------------------------------------------------------------------
    @staticmethod
    def public(b: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def create(self, raw: bytes) -> tuple[int, dict[str, Any]]:
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            return 400, error_body("Invalid JSON body.")
        if body.get("endpoint") != ENDPOINT or body.get("completion_window") != "24h":
            return 400, error_body(f"This smoke endpoint batches {ENDPOINT} with completion_window 24h only.")
        f = self.files.get(body.get("input_file_id") or "")
        if f is None or f["purpose"] != "batch":
            return 400, error_body(f"No batch input file {body.get('input_file_id')!r}.")
        try:
            lines = [json.loads(x) for x in f["data"].decode().splitlines() if x.strip()]
        except ValueError:
            return 400, error_body("The input file is not JSONL.")
        ids = [x.get("custom_id") for x in lines]
        if not lines or len(set(ids)) != len(ids) or any(x.get("url") != ENDPOINT for x in lines):
            return 400, error_body(f"Every line needs a unique custom_id and url {ENDPOINT}.")
        bid = f"batch_smoke_{len(self.batches) + 1:04d}_{hashlib.sha256(f['data']).hexdigest()[:12]}"
        now = int(time.time())
        self.batches[bid] = {"id": bid, "object": "batch", "endpoint": ENDPOINT, "errors": None,
                             "input_file_id": f["id"], "completion_window": "24h", "status": "validating",
                             "output_file_id": None, "error_file_id": None, "created_at": now,
                             "expires_at": now + 86400, "metadata": body.get("metadata"),
                             "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                             "_lines": lines, "_polls": 0}
        return 200, self.public(self.batches[bid])

    def listing(self, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        newest = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        if query.get("after"):
            ids = [b["id"] for b in newest]
            newest = newest[ids.index(query["after"]) + 1:] if query["after"] in ids else []
        limit = int(query.get("limit") or 20)
        page = newest[:limit]
        return 200, {"object": "list", "data": [self.public(b) for b in page],
                     "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None,
                     "has_more": len(newest) > limit}

    def poll(self, bid: str) -> tuple[int, dict[str, Any]]:
        b = self.batches.get(bid)
        if b is None:
            return 404, error_body(f"No such batch: {bid}")
        if b["status"] in ("validating", "in_progress"):
            b["_polls"] += 1
            b["status"] = "in_progress"
            b.setdefault("in_progress_at", int(time.time()))
            if b["_polls"] >= self.faults.batch_polls:
                self._finish(b, "failed" if self.faults.batch_fail else
                             "expired" if self.faults.batch_expire is not None else "completed")
        return 200, self.public(b)

    def _answer(self, line: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(the output line, None) or (None, the error line) for one input line."""
        cid, body = line["custom_id"], line.get("body") or {}
        rid = f"req_smoke_{hashlib.sha256(cid.encode()).hexdigest()[:16]}"

        def failed(status: int, err: dict[str, Any]) -> tuple[None, dict[str, Any]]:
            return None, {"id": f"batch_req_{rid[10:]}", "custom_id": cid,
                          "response": {"status_code": status, "request_id": rid, "body": err}, "error": None}

        if body.get("model") != MODEL_ID:
            return failed(404, error_body(f"The model `{body.get('model')}` does not exist.", code="model_not_found"))
        h = hashlib.sha256(f"batch:{self.faults.seed}:{cid}".encode()).digest()
        if int.from_bytes(h[:8], "big") / 2**64 < self.faults.batch_error_rate:  # a seeded failed line
            return failed(500, error_body("Internal server error (injected by the smoke endpoint).", "server_error"))
        fault = self.faults.draw(json.dumps(body, sort_keys=True).encode(), 0)
        if fault in ("429", "500"):
            return failed(int(fault), error_body(f"HTTP {fault} (injected by the smoke endpoint).", "server_error"))
        if fault == "400":
            return failed(400, error_body("Invalid request (injected by the smoke endpoint).", code="invalid_value"))
        reply = completion(body, fault if fault in ("invalid_json", "truncated") else None)
        return {"id": f"batch_req_{rid[10:]}", "custom_id": cid,
                "response": {"status_code": 200, "request_id": rid, "body": reply}, "error": None}, None

    def _finish(self, b: dict[str, Any], status: str) -> None:
        lines: list[dict[str, Any]] = b["_lines"]
        now = int(time.time())
        out: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        if status == "failed":
            b["errors"] = {"object": "list", "data": [{"code": "invalid_request", "line": None, "param": None,
                                                        "message": "Batch failed validation (injected by the "
                                                                   "smoke endpoint)."}]}
        else:
            n_done = {"completed": len(lines), "cancelled": 0}.get(
                status, math.floor(len(lines) * (self.faults.batch_expire or 0)))
            for i, line in enumerate(lines):
                if i >= n_done:
                    errors.append({"id": f"batch_req_x{i}", "custom_id": line["custom_id"], "response": None,
                                   "error": EXPIRED if status == "expired" else
                                   {"code": "batch_cancelled", "message": "The batch was cancelled."}})
                    continue
                ok, err = self._answer(line)
                out.append(ok) if ok else errors.append(err)
        jsonl = (lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
        if out:
            b["output_file_id"] = self._file(jsonl(out), "batch_output", f"{b['id']}_output.jsonl")["id"]
        if errors:
            b["error_file_id"] = self._file(jsonl(errors), "batch_output", f"{b['id']}_error.jsonl")["id"]
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(errors)}
        b["status"] = status
        b[f"{status}_at"] = now  # completed_at, expired_at, failed_at, cancelled_at
