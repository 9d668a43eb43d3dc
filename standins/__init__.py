"""Offline stand-ins for what the real recipe reaches over the network (above the stages: no stage imports them): the
journal mirror, the smoke-test OpenAI-compatible endpoint, the base-model builders, and the helper that runs them as
background services."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1, a GET answered by the server's `app.handle(handler)`, the access log at debug level (never headers),
    and `reply`, which a client that gave up (a time-out, a stall) does not break."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stalls

    def do_GET(self) -> None:  # noqa: N802
        self.server.app.handle(self)  # type: ignore[attr-defined]

    def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, fmt: str, *args: Any) -> None:
        logging.getLogger(type(self).__module__).debug("%s %s", self.address_string(), fmt % args)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the default listen backlog (5) drops bursts of connects: 1 s SYN retries


@contextlib.contextmanager
def serve(app: Any, host: str, port: int, handler: type[Handler], name: str) -> Iterator[tuple[str, int]]:
    """Serve `app` in a daemon thread for the duration of the block; yields the (host, port) it listens on."""
    server = _Server((host, port), handler)
    server.app = app  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
