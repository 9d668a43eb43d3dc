"""Scratch DVC workspaces: a git + DVC repo holding copies of the pipeline code (CODE) and a params.yaml = the repo's
overlaid with a profile, so dvc.yaml runs there unchanged and the repo's params.yaml stays the flagship recipe.

    qrb workspace DIR [--profile tiny] [-S key=value ...] [--force]     create or refresh one

A refresh records what it wrote (MANIFEST) and stops before overwriting an edit made since, unless --force.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from qrb.errors import ConfigError
from qrb.io import atomic_write_text, setup_logging, write_json
from qrb.params import deep_merge, nested, parse_set, read_yaml

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# models/README.md keeps models/ (a dep of the stages that load the base model) in a workspace whose base is a hub id;
# standins/: the stand-ins and base-model builders run there (`python -m standins.smoke` in the workspace)
CODE = ("dvc.yaml", "stages", "qrb", "standins", "prompts", "data.dvc", ".dvcignore", "models/README.md")
# data/: DVC's (data.dvc); logs/, dvc_plots/: the commands'; artifacts/, cache/: a failed stage leaves files there DVC
# has not git-ignored yet, and committing them made every later run fail ("already tracked by SCM")
WORKSPACE_GITIGNORE = ("/data", "__pycache__/", ".prefect/", "/logs", "/dvc_plots", "/artifacts", "/cache")
PLOT_TEMPLATES = Path(".dvc/plots")  # custom vega-lite templates dvc.yaml names (bars_from_zero)
PLOTS_PAGE = "plots/page.html"  # plots.html_template, relative to .dvc/ as DVC reads it
VEGA_LITE = "5.21"  # the version DVC's templates are written for ($schema vega-lite/v5)
MANIFEST = ".qrb-workspace.json"  # what the last refresh wrote: {project: {commit, dirty}, files: {path: sha256}}


def profile_params(profile: str | Path | None, repo: Path = REPO_ROOT,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    params = read_yaml(repo / "params.yaml")
    chain: list[Path] = []
    layers: list[tuple[str, dict[str, Any]]] = []
    while profile:  # a profile may start from another one (`extends: smol`), overlaid first
        path = Path(profile)
        if not path.suffix:
            path = repo / "profiles" / f"{profile}.yaml"
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in (repo / "profiles").glob("*.yaml")))
            raise ConfigError(f"profile {profile!r} not found ({path}); profiles/ has: {known}")
        if path in chain:
            raise ConfigError(f"{path}: `extends` goes round in a circle")
        chain.append(path)
        layer = read_yaml(path)
        profile = layer.pop("extends", None)
        layers.insert(0, (f"{path}: ", layer))
    for where, layer in [*layers, ("", overrides or {})]:
        try:
            params = deep_merge(params, layer)
        except ValueError as e:
            raise ConfigError(f"{where}{e}") from None
    return params


def dvc_stages(ws: Path) -> dict[str, Any]:
    """dvc.yaml's stages, name -> spec."""
    return (yaml.safe_load((ws / "dvc.yaml").read_text()) or {}).get("stages") or {}


def paths(entries: Any) -> list[str]:
    """The paths of a dvc.yaml list (deps, outs, metrics, plots), whose entries may be `{path: options}`."""
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries or []]


def venv_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: this interpreter's bin dir first, so dvc.yaml's `python` is ours."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("GX_ANALYTICS_ENABLED", "False")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    log.debug("$ %s  (in %s)", " ".join(cmd), cwd)
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def sync_code(ws: Path, repo: Path = REPO_ROOT) -> None:
    for name in CODE:
        src, dst = repo / name, ws / name
        if dst.is_dir():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def plots_page() -> str:
    """DVC's plots page with vega inlined (vl-convert-python's bundle), so `dvc plots show` draws offline (no
    `{scripts}`: DVC puts CDN tags there). Kept in the repo's .dvc/plots/ (git-ignored): bundling takes 10-20 s."""
    kept = REPO_ROOT / ".dvc" / PLOTS_PAGE
    stamp = f"vega-lite {VEGA_LITE}, from vl-convert-python {metadata.version('vl-convert-python')}"
    if kept.exists():
        text = kept.read_text(encoding="utf-8")
        if stamp in text[:1000]:
            return text
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    versions = f"vega {vl_convert.get_vega_version()}, vega-embed {vl_convert.get_vega_embed_version()}"
    text = ("<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset=\"utf-8\">\n"
            "    <title>DVC Plot</title>\n"
            f"    <!-- {versions}, {stamp} (BSD-3-Clause) -->\n"
            f"    <script type=\"text/javascript\">\n{bundle}\n    </script>\n"
            # SVG: marks a test (or a reader's devtools) can count, and sharp when zoomed
            "    <script type=\"text/javascript\">\n        (() => {\n            const embed = window.vegaEmbed;\n"
            "            window.vegaEmbed = (el, spec, opts) => embed(el, spec, {renderer: \"svg\", ...opts});\n"
            "        })();\n    </script>\n"
            "    <style>\n        table { border-spacing: 15px; }\n    </style>\n</head>\n<body>\n"
            "    {plot_divs}\n</body>\n</html>\n")
    with contextlib.suppress(OSError):  # a read-only checkout: bundle again next time
        atomic_write_text(kept, text)
    return text


def setup_plots(ws: Path, repo: Path = REPO_ROOT) -> None:
    """The custom plot templates and the offline plots page, in the workspace's .dvc/ (committed with it)."""
    dst = ws / PLOT_TEMPLATES
    dst.mkdir(parents=True, exist_ok=True)
    for src in sorted((repo / PLOT_TEMPLATES).glob("*.json")):
        shutil.copy2(src, dst / src.name)
    (ws / ".dvc" / PLOTS_PAGE).write_text(plots_page(), encoding="utf-8")
    if f"html_template = {PLOTS_PAGE}" not in (ws / ".dvc" / "config").read_text():
        run(dvc("config", "plots.html_template", PLOTS_PAGE), ws)


def _set_leaves(node: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            _set_leaves(node[key], value)
        elif node.get(key) != value:
            node[key] = value


YAML_WIDTH = 4096  # ruamel re-wraps long strings past its width: never, so a diff shows only what changed


def edit_params(text: str, edit: Callable[[Any], None]) -> str:
    """params.yaml `text` after `edit` on its ruamel round-trip data, written back as it was written: comments,
    indents, quotes, long lines, `null` spelled out."""
    from ruamel.yaml import YAML
    from ruamel.yaml.representer import RoundTripRepresenter

    class Representer(RoundTripRepresenter):
        pass

    Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    rt = YAML(typ="rt")
    rt.Representer = Representer
    rt.width = YAML_WIDTH
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    data = rt.load(text)
    edit(data)
    buf = io.StringIO()
    rt.dump(data, buf)
    return buf.getvalue()


def write_params(ws: Path, params: dict[str, Any], repo: Path = REPO_ROOT, profile: str | Path | None = None) -> None:
    """The repo's params.yaml (comments, layout) holding the values of `params`, so edits there diff line by line."""
    text = edit_params((repo / "params.yaml").read_text(), lambda data: _set_leaves(data, params))
    where = f"+ profile {profile} " if profile else ""
    head = (f"# Written by flows.workspace from the repo's params.yaml {where}(the comments are the repo's: they\n"
            "# describe the flagship recipe); edit it for experiments here (a refresh then stops unless --force).\n")
    atomic_write_text(ws / "params.yaml", head + text)


def written_files(root: Path) -> dict[str, str]:
    """sha256 of each file a refresh writes (CODE and params.yaml), by path relative to `root`."""
    out = {}
    for top in (root / name for name in (*CODE, "params.yaml")):
        for f in sorted(top.rglob("*")) if top.is_dir() else [top] if top.exists() else []:
            if f.is_file() and "__pycache__" not in f.parts:
                out[f.relative_to(root).as_posix()] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def edits(ws: Path) -> list[str]:
    """Files changed, added or removed since the last refresh (its manifest; else the uncommitted ones; in a folder
    that is no workspace, all)."""
    now = written_files(ws)
    if (ws / MANIFEST).exists():
        before = json.loads((ws / MANIFEST).read_text())["files"]
        return sorted(f for f in before.keys() | now.keys() if before.get(f) != now.get(f))
    if not (ws / ".dvc").exists():
        return sorted(now)
    status = run(["git", "status", "--porcelain", "--untracked-files=all", "--", *CODE, "params.yaml"], ws).stdout
    return sorted(line[3:] for line in status.splitlines())


def check_target(ws: str | Path, repo: Path = REPO_ROOT, force: bool = False) -> Path:
    """The workspace folder; refused when it is, holds or lies in the project's code, or a refresh would lose an edit."""
    ws, repo = Path(ws).resolve(), repo.resolve()
    if repo.is_relative_to(ws) or any(ws.is_relative_to(repo / name) for name in CODE):
        raise ConfigError(f"workspace {ws} is the project {repo} itself, holds it or lies in its code: a workspace is "
                          "a scratch copy, name another folder (e.g. demo)")
    changed = [] if force else edits(ws)
    if changed:
        listed = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ConfigError(f"workspace {ws} has edits a refresh would overwrite: {listed}. To keep them, commit them "
                          "there (git history keeps them) and refresh with --force; --force alone discards them")
    return ws


def project_source(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The project's commit, and whether what a workspace copies (code, params, profiles) differs from it."""
    head = run(["git", "rev-parse", "HEAD"], repo, check=False)
    status = run(["git", "status", "--porcelain", "--", *CODE, "params.yaml", "profiles"], repo, check=False)
    ok = head.returncode == 0 and status.returncode == 0
    return {"commit": head.stdout.strip() if ok else None, "dirty": bool(status.stdout.strip()) if ok else None}


def prepare(ws: str | Path, profile: str | None = "tiny", repo: Path = REPO_ROOT,
            overrides: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Create or refresh a workspace; idempotent (unchanged for DVC when nothing changed)."""
    ws = check_target(ws, repo, force)
    params = profile_params(profile, repo, overrides)
    ws.mkdir(parents=True, exist_ok=True)
    fresh = not (ws / ".dvc").exists()
    sync_code(ws, repo)
    write_params(ws, params, repo, profile)
    write_json(ws / MANIFEST, {"project": project_source(repo), "files": written_files(ws)})  # before a step can fail
    if fresh:
        run(["git", "init", "-q", "-b", "main"], ws)
        run(["git", "config", "user.email", "demo@quantum-research-bot.local"], ws)
        run(["git", "config", "user.name", "qrb demo"], ws)
        run(dvc("init", "-q"), ws)
        run(dvc("config", "core.autostage", "true"), ws)
        run(dvc("config", "core.analytics", "false"), ws)
    gitignore = ws / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.exists() else []
    if missing := [entry for entry in WORKSPACE_GITIGNORE if entry not in lines]:
        gitignore.write_text("\n".join(lines + missing) + "\n")
    if run(["git", "ls-files", "--error-unmatch", "data"], ws, check=False).returncode == 0:
        run(["git", "rm", "-r", "-q", "--cached", "data"], ws)  # an older workspace committed it
    setup_plots(ws, repo)
    # the repo's own remote (dvcstore/ inside the repo): data/ materialises offline
    run(dvc("remote", "add", "-f", "-d", "offline", str(repo / "dvcstore")), ws)
    run(dvc("pull", "-q", "data.dvc"), ws)
    commit(ws, "workspace: pipeline code and params" if fresh else "workspace: refresh code and params")
    return ws


def commit(ws: Path, message: str) -> None:
    run(["git", "add", "-A"], ws)
    if run(["git", "diff", "--cached", "--quiet"], ws, check=False).returncode != 0:
        run(["git", "commit", "-q", "-m", message], ws)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(prog="qrb workspace", description="Create or refresh a scratch DVC workspace")
    ap.add_argument("dir", help="the workspace folder (created if missing)")
    ap.add_argument("--profile", default="tiny", help="profile name in profiles/ or a YAML path; '' for none")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE", help="param override")
    ap.add_argument("--force", action="store_true", help="refresh even over edits made there since the last refresh")
    args = ap.parse_args(argv)
    try:
        overrides = nested(parse_set(args.set))
        print(prepare(args.dir, args.profile or None, overrides=overrides or None, force=args.force))
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"qrb workspace: {e}") from None


if __name__ == "__main__":
    main()
