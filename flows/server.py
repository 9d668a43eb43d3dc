"""A persistent Prefect server for runs that stay readable after the command ends (`qrb demo --server`): the one at
PREFECT_API_URL (or 127.0.0.1:4200) if it answers, else `prefect server start` in the background, in its own session,
left running (its output in PREFECT_HOME/qrb-server.log). docs/orchestration.md ("Servers")."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows.workspace import venv_env
from qrb.errors import ConfigError

DEFAULT_API = "http://127.0.0.1:4200/api"
STARTUP_S = 120.0  # a first start creates and migrates the database: ~10-30 s on a loaded 2-core machine


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def ensure(api_url: str | None = None, startup_s: float = STARTUP_S) -> tuple[str, int | None]:
    """(API URL of a running server: `api_url`, PREFECT_API_URL or the default, started here if local and silent,
    pid of the server started here or None)."""
    url = api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_API
    if healthy(url):
        return url, None
    u = urlparse(url)
    if u.hostname not in ("127.0.0.1", "localhost"):
        raise ConfigError(f"no Prefect server answers at {url} (only a local one is started here)")
    # PREFECT_HOME as the server started here sees it: the environment first, it is what the child reads
    log = Path(os.environ.get("PREFECT_HOME") or PREFECT_HOME.value()).expanduser() / "qrb-server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = venv_env()
    env.pop("PREFECT_API_URL", None)
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", u.hostname,
                                 "--port", str(u.port or 4200)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + startup_s
    while not healthy(url):
        if proc.poll() is not None:
            raise ConfigError(f"`prefect server start` exited (code {proc.returncode}); see {log}")
        if time.time() > deadline:
            raise ConfigError(f"the Prefect server did not answer at {url} within {startup_s:.0f} s; see {log}")
        time.sleep(0.5)
    return url, proc.pid


@contextlib.contextmanager
def using(api_url: str) -> Iterator[None]:
    """Runs in the block report to the server at `api_url`."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def ui_url(api_url: str, flow_run_id: object) -> str:
    """The UI page of a flow run on the server at `api_url` (the UI is served beside the API)."""
    return f"{api_url.rstrip('/').removesuffix('/api')}/runs/flow-run/{flow_run_id}"
