"""The house rules the folders stand for, checked from the code's own imports (walked with `ast`, lazy imports inside
functions included):

- layers run one way: qrb/ (the library stages import) <- stages/ <- standins/, apps/ <- flows/ <- qrb/cli.py;
  the qrb/ library imports no stage or flow (the CLI entry point imports flows), stages never import each other;
- every stage in dvc.yaml lists, as deps, every project module it imports (transitively), and no Python file it
  does not import: a change to any module a stage runs makes that stage stale, and nothing else.

Each checker is also run on a mutated copy, so the test is known to fail when an import or a dep goes wrong.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import REPO

PROJECT = ("qrb", "stages", "standins", "apps", "flows")
CLI_ENTRY = "qrb/cli.py"


def module_file(repo: Path, module: str) -> Path | None:
    """The file a dotted project module lives in (package -> its __init__.py), or None."""
    base = repo.joinpath(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.exists():
            return cand
    return None


def file_module(repo: Path, path: Path) -> str:
    rel = path.relative_to(repo).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_files(repo: Path, path: Path) -> set[Path]:
    """Project files that `path` imports, anywhere in its body (top-level or inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = file_module(repo, path) if path.name == "__init__.py" else file_module(repo, path).rpartition(".")[0]
    out: set[Path] = set()

    def add(module: str) -> None:
        # importing a.b.c imports the packages a and a.b too
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            f = module_file(repo, ".".join(parts[:i]))
            if f is not None:
                out.add(f)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PROJECT:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] not in PROJECT:
                continue
            add(module)
            for alias in node.names:  # `from qrb import loreft` imports the submodule qrb/loreft.py
                sub = module_file(repo, f"{module}.{alias.name}")
                if sub is not None:
                    add(f"{module}.{alias.name}")
    out.discard(path)
    return out


def closure(repo: Path, start: set[Path]) -> set[Path]:
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo += imported_files(repo, f) - seen
    return seen


def trivial_init(path: Path) -> bool:
    """A package marker: only a docstring and `__version__`; changing it changes no stage's behaviour."""
    if path.name != "__init__.py":
        return False
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) or
               isinstance(n, ast.Assign) and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["__version__"]
               for n in body)


def stage_entry(repo: Path, cmd: str) -> set[Path]:
    m = re.search(r"-m\s+([\w.]+)", cmd)
    if not m:
        raise AssertionError(f"stage cmd {cmd!r}: expected `python -m stages.<name>`")
    f = module_file(repo, m.group(1))
    assert f is not None, f"{m.group(1)} not found"
    main = f.parent / "__main__.py" if f.name == "__init__.py" else None
    return {f} | ({main} if main and main.exists() else set())


def dep_problems(repo: Path) -> list[str]:
    """What dvc.yaml gets wrong about each stage's code: modules run but not listed, .py deps listed but not run."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    problems = []
    for name, spec in stages.items():
        deps = [str(d) for d in spec.get("deps") or []]
        covered = [repo / d for d in deps]

        def listed(f: Path, covered: list[Path] = covered) -> bool:
            return any(f == c or c in f.parents for c in covered)

        files = closure(repo, stage_entry(repo, spec["cmd"]))
        for f in sorted(files):
            if not trivial_init(f) and not listed(f):
                problems.append(f"{name}: imports {f.relative_to(repo)} but dvc.yaml does not list it")
        for d in deps:
            path = repo / d
            if path.suffix == ".py" and path not in files:
                problems.append(f"{name}: lists {d} but does not import it")
    return problems


def layer_of(rel: str) -> str:
    return "cli" if rel == CLI_ENTRY else rel.split("/")[0]


# which layers each layer may import
ALLOWED = {
    "qrb": {"qrb"},
    "stages": {"qrb", "stages"},
    "standins": {"qrb", "standins"},
    "apps": {"qrb", "apps"},
    "flows": {"qrb", "standins", "flows"},
    "cli": {"qrb", "standins", "apps", "flows", "cli"},
}


def layer_problems(repo: Path) -> list[str]:
    problems = []
    for path in sorted(p for top in PROJECT for p in (repo / top).rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        src = layer_of(rel)
        for dep in sorted(imported_files(repo, path)):
            drel = dep.relative_to(repo).as_posix()
            dst = layer_of(drel)
            if dst not in ALLOWED[src] and not trivial_init(dep):
                problems.append(f"{rel} ({src}) imports {drel} ({dst})")
            if src == "stages" and dst == "stages" and drel.split("/")[1] != rel.split("/")[1] \
                    and not trivial_init(dep):
                problems.append(f"{rel} imports another stage: {drel}")
    return problems


def test_layers_run_one_way():
    assert layer_problems(REPO) == []


def test_every_stage_lists_every_module_it_imports():
    assert dep_problems(REPO) == []


@pytest.fixture()
def copy(tmp_path) -> Path:
    dst = tmp_path / "repo"
    for name in (*PROJECT, "dvc.yaml"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst / name)
    return dst


def test_the_layer_check_catches_an_upward_import(copy):
    def append(rel: str, line: str) -> None:
        (copy / rel).write_text((copy / rel).read_text() + line)

    append("qrb/model.py", "\n\ndef _x():\n    from flows.pipeline import pipeline  # noqa\n")
    append("standins/mirror/server.py", "\nfrom apps import bot  # noqa\n")
    append("stages/model_card/inputs.py", "\n\ndef _y():\n    from standins.smoke import MODEL_ID  # noqa\n")
    append("qrb/io.py", "\nimport standins.services  # noqa\n")
    append("stages/export.py", "\n\ndef _z():\n    from apps.bot import Bot  # noqa\n")
    append("qrb/retrieval.py", "\nfrom apps import ask  # noqa\n")
    append("flows/workspace.py", "\nimport apps.serve  # noqa\n")
    problems = layer_problems(copy)
    assert any(p.startswith("qrb/model.py (qrb) imports flows/pipeline.py") for p in problems), problems
    assert any(p.startswith("standins/mirror/server.py (standins) imports apps/bot.py") for p in problems)
    assert any(p.startswith("stages/model_card/inputs.py (stages) imports standins/smoke/") for p in problems)
    assert "qrb/io.py (qrb) imports standins/services.py (standins)" in problems, problems
    assert "stages/export.py (stages) imports apps/bot.py (apps)" in problems, problems
    assert "qrb/retrieval.py (qrb) imports apps/ask.py (apps)" in problems, problems
    assert "flows/workspace.py (flows) imports apps/serve.py (apps)" in problems, problems


def test_the_dep_check_catches_a_removed_dep_and_a_new_import(copy):
    spec = yaml.safe_load((copy / "dvc.yaml").read_text())
    spec["stages"]["train"]["deps"].remove("qrb/io.py")
    (copy / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    card_run = copy / "stages" / "model_card" / "run.py"
    card_run.write_text(card_run.read_text() + "\n\ndef _x():\n    from qrb import retrieval  # noqa\n")
    problems = dep_problems(copy)
    assert "train: imports qrb/io.py but dvc.yaml does not list it" in problems, problems
    assert "model_card: imports qrb/retrieval.py but dvc.yaml does not list it" in problems, problems
