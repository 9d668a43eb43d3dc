"""The smoke endpoint's HTTP server: routes (`POST /v1/chat/completions`, `GET /v1/models`, the Files and Batch API
of `batches`), the API-key check, injectable faults (`Faults`), `serve_smoke_endpoint` and the command line.

A request's fault draw is seeded and depends only on its body and how many times that body was seen, so a run's
faults do not depend on thread scheduling. `refuse_formats` plays a server that does not support some
`response_format` types (by default as llama-cpp-python answers `json_schema`: HTTP 500).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import signal
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from qrb.io import setup_logging
from standins import Handler, serve

from .batches import BatchStore
from .completions import MODEL_ID, completion, error_body

log = logging.getLogger(__name__)

# what llama-cpp-python's server answers (HTTP 500) to `response_format: {"type": "json_schema", ...}`
LLAMA_CPP_REFUSAL = ("1 validation error for CreateChatCompletionRequest response_format.type Input should be 'text' "
                     "or 'json_object' [type=literal_error, input_value='json_schema', input_type=str]")
BAD_REQUEST = "Invalid 'max_tokens': the request exceeds this model's context (injected by the smoke endpoint)."

RATES = ("429", "500", "stall", "invalid_json", "truncated", "400")  # the per-request faults, in the order drawn
BANNER = ("qrb smoke endpoint: an OpenAI-compatible SMOKE-TEST stand-in. It is NOT a language model: it copies "
          "sentences of the paper's abstract into question/answer pairs (model id %s).")


@dataclasses.dataclass(frozen=True)
class Faults:
    """Injectable latency and faults; each rate is a probability per request (they are exclusive, summed <= 1)."""

    latency_s: float = 0.0          # added to every request
    rate_429: float = 0.0
    retry_after_s: float = 0.05     # sent as `retry-after-ms` and (rounded up) `Retry-After`
    rate_500: float = 0.0
    rate_stall: float = 0.0
    stall_s: float = 5.0            # a stalled reply comes after this long
    rate_invalid_json: float = 0.0
    rate_truncated: float = 0.0
    rate_400: float = 0.0           # a bad request that no retry can fix
    seed: int = 0
    refuse_formats: tuple[str, ...] = ()   # response_format types this server rejects (e.g. ("json_schema",))
    refuse_status: int = 500
    refuse_message: str = LLAMA_CPP_REFUSAL
    batch_polls: int = 2                  # a batch is done at its batch_polls-th status poll (`batches`)
    batch_error_rate: float = 0.0         # share of a batch's lines that fail (HTTP 500 in its error file), seeded
    batch_expire: float | None = None     # the batch expires with this share of its lines done (None: it completes)
    batch_fail: bool = False              # the batch fails validation (no output file)

    def __post_init__(self) -> None:
        total = sum(getattr(self, f"rate_{name}") for name in RATES)
        if total > 1.0 + 1e-9:
            raise ValueError(f"smoke endpoint: fault rates sum to {total:.2f} > 1")
        if self.batch_polls < 1 or not 0 <= self.batch_error_rate <= 1 or not 0 <= (self.batch_expire or 0) <= 1:
            raise ValueError("smoke endpoint: batch_polls must be >= 1, batch_error_rate and batch_expire in [0, 1]")

    def draw(self, body: bytes, occurrence: int) -> str | None:
        """The fault for the `occurrence`-th request with this body (deterministic), or None."""
        h = hashlib.sha256(f"{self.seed}:{occurrence}:".encode() + body).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        for name in RATES:
            rate = getattr(self, f"rate_{name}")
            if u < rate:
                return name
            u -= rate
        return None


class SmokeEndpoint:
    """A running smoke endpoint: `.base_url` (ends in /v1), `.requests` (one dict per request seen: n, method, path,
    fault, time, and the `response_format` type of a chat-completions request)."""

    def __init__(self, faults: Faults | None = None, api_key: str | None = None) -> None:
        self.faults = faults or Faults()
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.batches = BatchStore(self.faults)
        self.host, self.port = "", 0
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def completions_count(self) -> int:
        with self._lock:
            return sum(r["path"].endswith("/chat/completions") for r in self.requests)

    def count(self, method: str, path: str) -> int:
        """Requests seen with this method and path (`/v1/batches`: batches created; `/v1/files`: uploads)."""
        with self._lock:
            return sum(r["method"] == method and r["path"] == path for r in self.requests)

    def _send(self, h: Handler, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()
        h.reply(status, {"Content-Type": "application/octet-stream" if isinstance(obj, bytes) else "application/json",
                         "Content-Length": str(len(data)), **(headers or {})}, data)

    def handle(self, h: Handler) -> None:
        method = h.command
        path, _, qs = h.path.partition("?")
        path = path.rstrip("/")
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        auth = h.headers.get("Authorization", "")
        digest = hashlib.sha256(raw).hexdigest()
        with self._lock:
            n = len(self.requests) + 1
            occurrence = self._seen.get(digest, 0)
            self._seen[digest] = occurrence + 1
            fault = self.faults.draw(raw, occurrence) if path.endswith("/chat/completions") else None
            record = {"n": n, "method": method, "path": path, "fault": fault, "time": time.time()}
            self.requests.append(record)
        log.info("smoke endpoint: request #%d %s %s%s", n, method, path, f" [fault: {fault}]" if fault else "")
        if self.faults.latency_s:
            self.stopping.wait(self.faults.latency_s)
        if not auth.startswith("Bearer ") or (self.api_key is not None and auth != f"Bearer {self.api_key}"):
            return self._send(h, 401, error_body("Missing or invalid API key.", code="invalid_api_key"))
        model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "qrb-smoke-endpoint"}
        if method == "GET" and path in ("/v1/models", "/models"):
            return self._send(h, 200, {"object": "list", "data": [model]})
        if method == "GET" and path in (f"/v1/models/{MODEL_ID}", f"/models/{MODEL_ID}"):
            return self._send(h, 200, model)
        if path.startswith(("/v1/files", "/v1/batches", "/files", "/batches")):
            query = dict(urllib.parse.parse_qsl(qs))
            return self._send(h, *self.batches.handle(method, path, query, raw, h.headers.get("Content-Type", "")))
        if not (method == "POST" and path.endswith("/chat/completions")):
            return self._send(h, 404, error_body(f"Unknown route {method} {path}"))
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                raise ValueError("`messages` must be a list")
        except ValueError as e:
            return self._send(h, 400, error_body(f"Invalid request body: {e}"))
        if body.get("model") != MODEL_ID:
            return self._send(h, 404, error_body(
                f"The model `{body.get('model')}` does not exist; this smoke endpoint serves `{MODEL_ID}`.",
                code="model_not_found"))
        rf = body.get("response_format")
        with self._lock:
            record["response_format"] = rf.get("type") if isinstance(rf, dict) else None
        if isinstance(rf, dict) and rf.get("type") in self.faults.refuse_formats:
            return self._send(h, self.faults.refuse_status, error_body(self.faults.refuse_message))
        if fault == "400":
            return self._send(h, 400, error_body(BAD_REQUEST, code="invalid_value"))
        if fault == "429":
            ra = self.faults.retry_after_s
            return self._send(h, 429, error_body("Rate limit reached (injected by the smoke endpoint).",
                                                 "rate_limit_error", "rate_limit_exceeded"),
                              {"Retry-After": str(math.ceil(ra)), "retry-after-ms": str(int(ra * 1000))})
        if fault == "500":
            return self._send(h, 500, error_body("Internal server error (injected by the smoke endpoint).",
                                                 "server_error"))
        if fault == "stall" and self.stopping.wait(self.faults.stall_s):
            return
        return self._send(h, 200, completion(body, fault))


class _Handler(Handler):
    server_version = "qrb-smoke-endpoint"
    do_POST = Handler.do_GET  # noqa: N815


@contextlib.contextmanager
def serve_smoke_endpoint(port: int = 0, faults: Faults | None = None, host: str = "127.0.0.1",
                         api_key: str | None = None) -> Iterator[SmokeEndpoint]:
    """Serve the smoke endpoint in a background thread for the duration of the `with` block."""
    ep = SmokeEndpoint(faults=faults, api_key=api_key)
    with serve(ep, host, port, _Handler, "smoke-endpoint") as address:
        ep.host, ep.port = address
        log.info(BANNER, MODEL_ID)
        log.info("qrb smoke endpoint: serving %s (faults: %s)", ep.base_url, ep.faults)
        try:
            yield ep
        finally:
            ep.stopping.set()  # a stalled reply returns at once


def main(argv: list[str] | None = None) -> None:
    import standins.smoke

    ap = argparse.ArgumentParser(prog="qrb smoke-endpoint",
                                 description=standins.smoke.__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8732, help="port (default 8732, what profiles/tiny.yaml names)")
    ap.add_argument("--latency", type=float, default=0.0, dest="latency_s", metavar="LATENCY",
                    help="seconds added to every request")
    for name in RATES:
        ap.add_argument(f"--rate-{name.replace('_', '-')}", type=float, default=0.0, dest=f"rate_{name}",
                        metavar="P", help=f"fraction of requests answered with the fault {name!r} (default 0)")
    ap.add_argument("--stall-s", type=float, default=5.0, help="a stalled reply comes after this long (default 5)")
    ap.add_argument("--retry-after-s", type=float, default=0.05, help="the Retry-After a 429 sends (default 0.05)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault draws (default 0)")
    ap.add_argument("--refuse-format", action="append", default=[], choices=("json_schema", "json_object"),
                    dest="refuse_formats", help="answer this response_format type with --refuse-status (repeatable)")
    ap.add_argument("--refuse-status", type=int, default=500, help="HTTP status of a refusal (default 500)")
    ap.add_argument("--refuse-message", default=LLAMA_CPP_REFUSAL, help="error message of a refusal (llama.cpp's)")
    ap.add_argument("--batch-polls", type=int, default=2, help="a batch is done at this status poll (default 2)")
    ap.add_argument("--batch-error-rate", type=float, default=0.0, metavar="P",
                    help="fraction of a batch's requests that fail, in its error file (default 0)")
    ap.add_argument("--batch-expire", type=float, default=None, metavar="P",
                    help="batches expire with this fraction of their requests done (default: they complete)")
    ap.add_argument("--batch-fail", action="store_true", help="batches fail validation")
    ap.add_argument("--quiet", action="store_true", help="don't log each request")
    args = ap.parse_args(argv)
    setup_logging()
    if args.quiet:
        log.setLevel(logging.WARNING)
        log.warning(BANNER, MODEL_ID)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)}
    faults = Faults(**{**fields, "refuse_formats": tuple(args.refuse_formats)})
    try:
        with serve_smoke_endpoint(args.port, faults, args.host) as ep:
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
            log.info("smoke endpoint: stopped after %d requests", ep.request_count)
    except OSError as e:
        raise SystemExit(f"smoke endpoint: cannot listen on {args.host}:{args.port} ({e.strerror})") from None
