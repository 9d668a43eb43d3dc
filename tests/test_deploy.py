"""`qrb deploy` before anything is registered: the checks that turn a deployment that could never work into one line.

The deployments themselves, run end to end across a real server, a work pool and its worker, are in
tests/test_deploy_e2e.py (slow).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows import deploy
from qrb.errors import EXIT_CONFIG, ConfigError
from standins.services import free_ports


def qrb_deploy(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    from flows.workspace import venv_env

    return subprocess.run([str(Path(sys.executable).parent / "qrb"), "deploy", *args], env=venv_env(env),
                          cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("source", ["https://github.com/someone/quantum-research-bot.git",
                                    "https://github.com/someone/quantum-research-bot",
                                    "git@github.com:someone/quantum-research-bot.git", "/srv/git/qrb.git"])
def test_a_git_source_needs_an_absolute_workspace(source):
    """A worker checks a git source out into a temporary folder per run and deletes it after: a workspace inside it
    would lose its outputs, the DVC cache and the crawler's seen-set with every run."""
    assert deploy.is_git(source)
    with pytest.raises(ConfigError, match="absolute path on the worker"):
        deploy.worker_workspace(source, "demo")
    assert deploy.worker_workspace(source, "/home/me/qrb/demo") == "/home/me/qrb/demo"


def test_a_local_source_runs_in_place_so_a_relative_workspace_is_inside_it(tmp_path):
    assert not deploy.is_git(str(tmp_path))
    assert deploy.worker_workspace(str(tmp_path), "demo") == str(tmp_path / "demo")
    assert deploy.worker_workspace(str(tmp_path), ".") == str(tmp_path)


def test_env_items_must_be_name_value():
    assert deploy.parse_env(["CUDA_VISIBLE_DEVICES=0", "A=b=c"]) == {"CUDA_VISIBLE_DEVICES": "0", "A": "b=c"}
    with pytest.raises(ConfigError, match="--env CUDA_VISIBLE_DEVICES: expected NAME=VALUE"):
        deploy.parse_env(["CUDA_VISIBLE_DEVICES"])


def test_deploy_without_a_server_is_one_line(tmp_path, monkeypatch):
    """Without PREFECT_API_URL Prefect would register the deployment in a temporary server that is gone when the
    command ends (no worker could ever see it), after a traceback when that server is slow to start."""
    proc = qrb_deploy("pool", "--pool", "gpu", "--workspace", str(tmp_path), env={"PREFECT_API_URL": ""}, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert proc.stderr.count("\n") == 1 and "PREFECT_API_URL" in proc.stderr, proc.stderr
    assert proc.stderr.startswith("qrb deploy: no Prefect server"), proc.stderr
    port = free_ports(1)[0]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with pytest.raises(ConfigError, match=f"no Prefect server answers at http://127.0.0.1:{port}/api"):
        deploy.require_server()


def test_serve_needs_the_generate_key_the_refresh_will_use(tmp_path, monkeypatch):
    """The weekly refresh re-runs generate whenever the crawl found papers: without the key variable every such run
    would fail at generate (exit 78), a week later."""
    (tmp_path / "dvc.yaml").write_text("stages:\n  generate:\n    cmd: python -m stages.generate\n")
    (tmp_path / "params.yaml").write_text("generate:\n  api_key_env: QRB_TEST_UNSET_KEY\n")
    monkeypatch.delenv("QRB_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"QRB_TEST_UNSET_KEY is not set.*qrb services -- qrb deploy serve"):
        deploy.check_generate_key(str(tmp_path))
    monkeypatch.setenv("QRB_TEST_UNSET_KEY", "k")
    deploy.check_generate_key(str(tmp_path))
