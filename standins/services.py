"""The offline stand-in services (journal mirror, smoke-test OpenAI endpoint) as child processes.

    qrb services [--workspace demo] [-- COMMAND ...]

serves both at the URLs the workspace's params.yaml names (`scrape.start_urls`, `generate.base_url`; 127.0.0.1
only). With a COMMAND, it runs in the workspace with `generate.api_key_env` set (the smoke endpoint accepts any key),
then the services stop; without one they serve until Ctrl-C (docs/orchestration.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from qrb.errors import ConfigError

log = logging.getLogger(__name__)

SMOKE_KEY_VALUE = "offline-smoke-test-key"  # not a secret: the local smoke endpoint accepts any key


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def free_ports(n: int) -> list[int]:
    """`n` distinct ports on 127.0.0.1 that nothing listens on now (tests and benchmarks beside `qrb demo`)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:  # all bound at once, so the kernel cannot hand out the same port twice
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def port_overrides(params: dict, mirror_port: int, endpoint_port: int) -> dict:
    """Params overrides that move the offline stand-ins (journal mirror, smoke endpoint) to other ports."""
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
        raise ConfigError(f"offline services run on 127.0.0.1 only, not {url}")
    return u.hostname, u.port or 80


@contextlib.contextmanager
def background(name: str, args: list[str], url: str, cwd: Path, startup_s: float = 30.0) -> Iterator[None]:
    """Run `python <args>` serving `url` for the duration of the block."""
    host, port = host_port(url)
    if port_open(host, port):
        raise ConfigError(f"{name}: port {port} on {host} is already in use (another demo or `qrb services` "
                          "running?)")
    # its log goes to a file, not a pipe: an unread pipe fills up (~64 KiB) and blocks a chatty service
    log_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        deadline = time.time() + startup_s
        while not port_open(host, port):
            if proc.poll() is not None:
                log_file.seek(0)
                raise ConfigError(f"{name} exited at start (exit {proc.returncode}): {log_file.read()[-1000:]}")
            if time.time() > deadline:
                raise ConfigError(f"{name} did not listen on {host}:{port} within {startup_s:.0f} s")
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


def stand_ins(ws: Path, params: dict | None = None) -> contextlib.ExitStack:
    """Mirror + smoke endpoint at the URLs the workspace's params name, for the duration of the returned stack. Sets
    the smoke endpoint's key variable in this process's environment (children inherit it) when it is unset."""
    from qrb.params import read_yaml

    params = params or read_yaml(ws / "params.yaml")
    stack = contextlib.ExitStack()
    start = params["scrape"]["start_urls"][0]
    stack.enter_context(background("journal mirror", ["-m", "standins.mirror", "--corpus", "data/corpus",
                                                      "--port", str(host_port(start)[1])], start, ws))
    gen = params["generate"]
    os.environ.setdefault(gen["api_key_env"], SMOKE_KEY_VALUE)
    stack.enter_context(background("smoke-test endpoint", ["-m", "standins.smoke", "--port",
                                                           str(host_port(gen["base_url"])[1])], gen["base_url"], ws))
    return stack


def main(argv: list[str] | None = None) -> None:
    from qrb.io import setup_logging
    from qrb.params import read_yaml

    ap = argparse.ArgumentParser(description="Serve a workspace's offline stand-ins (journal mirror, smoke endpoint) "
                                             "at the URLs its params.yaml names")
    ap.add_argument("--workspace", help="the workspace (default: demo/ if there is one here, else .)")
    ap.add_argument("command", nargs=argparse.REMAINDER,
                    help="run this in the workspace with the services up and the key set, then stop (after --)")
    args = ap.parse_args(argv)
    setup_logging(logging.WARNING)
    ws = Path(args.workspace or ("demo" if Path("demo/params.yaml").exists() else "."))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        params = read_yaml(ws / "params.yaml")
        key_env = params["generate"]["api_key_env"]
        with stand_ins(ws, params):
            if command:
                env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
                sys.exit(subprocess.run(command, cwd=ws, env=env).returncode)
            print(f"journal mirror  {params['scrape']['start_urls'][0]}\n"
                  f"smoke endpoint  {params['generate']['base_url']}  (any key; generate reads ${key_env})\n"
                  f"serving until Ctrl-C. In another shell: cd {ws} && export {key_env}={SMOKE_KEY_VALUE} && "
                  "dvc repro -f scrape", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except (ConfigError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"qrb services: {e}")


if __name__ == "__main__":
    main()
