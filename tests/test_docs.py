"""The README fits a screen and names only commands that exist; the docs' relative links resolve in a fresh clone."""

from __future__ import annotations

import re
from pathlib import Path

from qrb.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_readme_fits_a_screen():
    assert len(README.splitlines()) <= 200


def test_readme_commands_exist():
    named_qrb = set(re.findall(r"\bqrb ([a-z][a-z-]*)", README))
    named_make = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    assert named_qrb and named_make
    assert named_qrb <= set(COMMANDS), named_qrb - set(COMMANDS)
    assert named_make <= make_targets(), named_make - make_targets()
    for profile in re.findall(r"PROFILE=([\w-]+)", README):
        assert (ROOT / "profiles" / f"{profile}.yaml").is_file(), profile


def anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", md.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_doc_links_resolve():
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = (doc.parent / target) if target else doc
            assert path.exists(), f"{doc.name}: {target}"
            # data/ is DVC-tracked, not in git: a link into it is broken on a fresh clone and on the forge
            assert not path.resolve().is_relative_to(ROOT / "data"), f"{doc.name}: {target}"
            if anchor and path.suffix == ".md":
                assert anchor in anchors(path), f"{doc.name}: {target}#{anchor}"


def test_no_issue_numbers_in_docs():
    for doc in DOCS:
        assert not re.search(r"\bissues? #?\d+", doc.read_text(), re.I), doc.name
