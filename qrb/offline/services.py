"""Start the offline stand-in services (journal mirror, smoke-test OpenAI endpoint) as child processes."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_ports(n: int) -> list[int]:
    """`n` distinct ports on 127.0.0.1 that nothing listens on now (tests and benchmarks beside `qrb demo`)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once, so the kernel cannot hand out the same port twice
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_overrides(params: dict, mirror_port: int, endpoint_port: int) -> dict:
    """Params overrides that move the offline stand-ins (journal mirror, smoke endpoint) to other ports."""
    from urllib.parse import urlparse

    def move(url: str, port: int) -> str:
        u = urlparse(url)
        return u._replace(netloc=f"{u.hostname}:{port}").geturl()

    scrape, gen = params["scrape"], params["generate"]
    return {"scrape": {"start_urls": [move(u, mirror_port) for u in scrape["start_urls"]],
                       "full_text_url": move(scrape["full_text_url"], mirror_port)},
            "generate": {"base_url": move(gen["base_url"], endpoint_port)}}


def host_port(url: str) -> tuple[str, int]:
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"offline services run on 127.0.0.1 only, not {url}")
    return u.hostname, u.port or 80


@contextlib.contextmanager
def background(name: str, args: list[str], url: str, cwd: Path, startup_s: float = 30.0) -> Iterator[None]:
    """Run `python <args>` serving `url` for the duration of the block."""
    host, port = host_port(url)
    if port_open(host, port):
        raise SystemExit(f"{name}: port {port} on {host} is already in use (another demo running?)")
    # its log goes to a file, not a pipe: an unread pipe fills up (~64 KiB) and blocks a chatty service
    log_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=log_file, text=True)

    def log_tail() -> str:
        log_file.seek(0)
        return log_file.read()[-1000:]

    try:
        deadline = time.time() + startup_s
        while not port_open(host, port):
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited at start (exit {proc.returncode}): {log_tail()}")
            if time.time() > deadline:
                raise SystemExit(f"{name} did not listen on {host}:{port} within {startup_s:.0f} s")
            time.sleep(0.1)
        log.info("%s serving %s", name, url)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
