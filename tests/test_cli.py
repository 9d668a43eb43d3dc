"""The command line as a user meets it, through subprocesses: every stage's and every `qrb` command's `--help`, and the
one-line errors of `qrb run`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from qrb.cli import COMMANDS

STAGES = list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
SUBCOMMANDS = {"deploy": ["serve", "pool"]}  # argparse sub-parsers: their options need help too


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def undocumented_options(help_text: str) -> list[str]:
    """Options in argparse's help output with no help text (the option line alone, no description after it)."""
    lines = help_text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(\s{2,}\S.*)?$", line)
        if not m or m.group(1).startswith(("-h, --help", "--help")):
            continue
        follows = lines[i + 1] if i + 1 < len(lines) else ""
        described = m.group(2) or re.match(r"^\s{4,}\S", follows) and not follows.strip().startswith("-")
        if not described:
            missing.append(m.group(1).split(",")[0].split()[0])
    return missing


def test_undocumented_options_are_found():  # the checker itself, on argparse's two layouts
    text = ("options:\n  -h, --help  show this help message and exit\n  --workspace WORKSPACE\n"
            "  --profile PROFILE     the profile\n  --a-very-long-option-name A_VERY_LONG_OPTION_NAME\n"
            "                        described on the next line\n  --port PORT\n")
    assert undocumented_options(text) == ["--workspace", "--port"]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_help_prints_usage_and_unknown_argument_exits_2(stage, tmp_path):
    # run outside any workspace: a stage that ignored its arguments would fail on the missing params.yaml (exit 78)
    # rather than pass, and could write nothing of the repo's
    helped = run(["-m", f"stages.{stage}", "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert helped.stdout.startswith(f"usage: python -m stages.{stage}"), helped.stdout[:300]
    assert not list(tmp_path.iterdir())
    bad = run(["-m", f"stages.{stage}", "--no-such-option"], tmp_path)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "unrecognized arguments: --no-such-option" in bad.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", [*COMMANDS, *(f"{c} {s}" for c, subs in SUBCOMMANDS.items() for s in subs)])
def test_every_qrb_command_has_usage_and_help_for_every_option(cmd, tmp_path):
    proc = run(["-m", "qrb.cli", *cmd.split(), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: qrb {cmd}"), proc.stdout[:300]
    assert undocumented_options(proc.stdout) == [], proc.stdout


def test_qrb_run_unknown_stage_is_one_line_with_the_choices(tmp_path):
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    proc = run(["-m", "qrb.cli", "run", "--workspace", str(tmp_path), "--until", "valdate"], REPO)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.strip().splitlines()
    assert "valdate" in line and "did you mean 'validate'" in line, line
    assert all(stage in line for stage in STAGES), line
    forced = run(["-m", "qrb.cli", "run", "--workspace", str(tmp_path), "--force", "scrap"], REPO)
    assert forced.returncode == 2 and len(forced.stderr.strip().splitlines()) == 1, forced.stderr


def test_qrb_run_missing_workspace_is_one_line(tmp_path):
    missing = tmp_path / "no-such-workspace"
    proc = run(["-m", "qrb.cli", "run", "--workspace", str(missing)], REPO)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(missing) in line and "qrb workspace" in line, line
    assert not missing.exists()


@pytest.mark.parametrize("override, expected", [
    ("train.lora.rr=4", "unknown key `train.lora.rr` (did you mean `train.lora.r`?)"),
    ("trian.epochs=2", "unknown key `trian` (did you mean `train`?)"),
    ("generate.concurrency=abc", "`generate.concurrency` must be an integer, got 'abc'"),
])
def test_qrb_run_bad_override_is_one_line_and_changes_nothing(override, expected, tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((REPO / name).read_text())
    (tmp_path / "artifacts" / "generate").mkdir(parents=True)
    (tmp_path / "artifacts" / "generate" / "train.jsonl").write_text('{"question": "q"}\n')
    proc = run(["-m", "qrb.cli", "run", "--workspace", str(tmp_path), "-S", override], REPO)
    assert proc.returncode == 78, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()
    assert expected in line, line
    assert (tmp_path / "params.yaml").read_text() == (REPO / "params.yaml").read_text()
    assert (tmp_path / "artifacts" / "generate" / "train.jsonl").read_text() == '{"question": "q"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "dvc.yaml", "params.yaml"]


def test_qrb_services_serves_the_workspace_stand_ins_for_a_command(tmp_path):
    from flows.workspace import profile_params
    from standins.services import free_ports, port_overrides

    params = profile_params("tiny", REPO, port_overrides(profile_params("tiny", REPO), *free_ports(2)))
    ws = tmp_path / "ws"
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "corpus").symlink_to(REPO / "data" / "corpus")
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    probe = ("import os, sys, urllib.request\n"
             f"page = urllib.request.urlopen({params['scrape']['start_urls'][0]!r}, timeout=10).read().decode()\n"
             f"req = urllib.request.Request({params['generate']['base_url'] + '/models'!r}, headers="
             "{'Authorization': 'Bearer ' + os.environ['QRB_SMOKE_API_KEY']})\n"
             "models = urllib.request.urlopen(req, timeout=10).read().decode()\n"
             "print('mirror', 'doi' in page.lower() or '/papers/' in page, 'endpoint', 'qrb-smoke' in models)\n"
             "sys.exit(3)\n")
    env_key = {k: v for k, v in os.environ.items() if k != "QRB_SMOKE_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "services", "--workspace", str(ws), "--",
                           sys.executable, "-c", probe], env={**env_key, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the command's own exit code
    assert proc.stdout.strip() == "mirror True endpoint True", proc.stdout + proc.stderr[-2000:]
