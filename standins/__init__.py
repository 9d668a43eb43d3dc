"""Offline stand-ins for what the real recipe reaches over the network (above the stages: no stage imports them): the
journal mirror, the smoke-test OpenAI-compatible endpoint, the base-model builders, and the helper that runs them as
background services."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer


@contextlib.contextmanager
def serve_in_thread(server: ThreadingHTTPServer, name: str) -> Iterator[None]:
    """Run `server` in a daemon thread for the duration of the block."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
