"""Scratch workspaces (flows/workspace.py): a refresh never loses a user's edit, the project is never its own
workspace, and an adapter made in one leads back to the project's commit."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from flows import workspace as wsp
from helpers import REPO
from qrb.errors import ConfigError


def git(ws, *args) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout


def test_a_refresh_stops_on_edits_and_force_discards_them(tmp_path):
    ws = wsp.prepare(tmp_path / "ws", "tiny")
    refreshed = (ws / "params.yaml").read_text()
    edited = refreshed.replace("epochs:", "epochs: 7  #", 1)
    (ws / "params.yaml").write_text(edited)                        # an experiment's edit, not committed
    (ws / "stages" / "mine.py").write_text("X = 1\n")              # a new module of the user's
    with pytest.raises(ConfigError) as e:
        wsp.prepare(ws, "tiny")
    line = str(e.value)
    assert "\n" not in line and "params.yaml" in line and "stages/mine.py" in line and "--force" in line, line
    assert (ws / "params.yaml").read_text() == edited and (ws / "stages" / "mine.py").exists()  # nothing touched
    git(ws, "add", "-A")
    git(ws, "commit", "-q", "-m", "my experiment")                 # kept in history: still not overwritten silently
    with pytest.raises(ConfigError, match="params.yaml"):
        wsp.prepare(ws, "tiny")
    wsp.prepare(ws, "tiny", force=True)
    assert (ws / "params.yaml").read_text() == refreshed and not (ws / "stages" / "mine.py").exists()
    assert "epochs: 7" in git(ws, "show", "HEAD~1:params.yaml")
    wsp.prepare(ws, "tiny")                                        # nothing edited since: a plain refresh


def test_a_workspace_from_before_the_manifest_refreshes_and_keeps_its_uncommitted_edits(tmp_path):
    """An older workspace: no manifest, and data/ committed to its git. Its uncommitted edits stop a refresh; with
    none, the refresh runs and untracks data/ (DVC's)."""
    ws = wsp.prepare(tmp_path / "ws", "tiny")
    (ws / wsp.MANIFEST).unlink()
    assert any((ws / "data").iterdir())  # pulled by DVC
    git(ws, "add", "-f", "data")
    git(ws, "commit", "-q", "-m", "older workspace")
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text() + "\n# mine\n")
    with pytest.raises(ConfigError) as e:
        wsp.prepare(ws, "tiny")
    assert "params.yaml" in str(e.value) and "dvc.yaml" not in str(e.value)  # only what the user changed
    git(ws, "checkout", "--", "params.yaml")
    wsp.prepare(ws, "tiny")
    assert git(ws, "ls-files", "data") == "" and (ws / wsp.MANIFEST).exists()


@pytest.mark.parametrize("where", ["project", "parent", "inside its code"])
def test_the_project_itself_is_never_a_workspace(tmp_path, where):
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    (project / "dvc.yaml").write_text("stages: {}\n")
    (project / "params.yaml").write_text("base: {seed: 1}\n")
    (project / "stages" / "keep.py").write_text("KEEP = 1\n")
    ws = {"project": project, "parent": tmp_path, "inside its code": project / "stages" / "ws"}[where]
    with pytest.raises(ConfigError) as e:
        wsp.prepare(ws, None, repo=project)
    assert "\n" not in str(e.value) and "project" in str(e.value)
    assert sorted(p.name for p in project.rglob("*")) == ["dvc.yaml", "keep.py", "params.yaml", "stages"]


def test_lineage_names_the_projects_commit_and_ignores_run_outputs(tmp_path, monkeypatch):
    from stages.train.lineage import source

    ws = wsp.prepare(tmp_path / "ws", "tiny")
    head = git(REPO, "rev-parse", "HEAD").strip()
    dirty = bool(git(REPO, "status", "--porcelain", "--", *wsp.CODE, "params.yaml", "profiles").strip())
    assert json.loads((ws / wsp.MANIFEST).read_text())["project"] == {"commit": head, "dirty": dirty}
    # a run's outputs, as dvc leaves them while train runs: the lock, metrics and reports of earlier stages
    (ws / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for rel in ("metrics/validate.json", "reports/validate.json", "plots/evaluate/scores/seen.csv",
                "dvclive/metrics.json"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("{}\n")
    monkeypatch.chdir(ws)
    got = source()
    assert got["git_commit"] == git(ws, "rev-parse", "HEAD").strip() and got["git_dirty"] is False, got
    assert got["project_commit"] == head and got["project_dirty"] is dirty, got
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["train"]["epochs"] = 9
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    assert source()["git_dirty"] is True


def test_the_model_card_names_the_project_commit_and_the_workspaces():
    from stages.model_card.render import built_from

    ws_run = {"git_commit": "0a077e6", "git_dirty": False, "project_commit": "f5f2b5f", "project_dirty": True}
    assert built_from(ws_run) == ("`f5f2b5f` (with uncommitted changes), run in a scratch workspace at its commit "
                                  "`0a077e6`")
    assert built_from({"git_commit": "f5f2b5f", "git_dirty": False}) == "`f5f2b5f`"  # lineage of an older run
    assert built_from({}) == "`not a git checkout`"
