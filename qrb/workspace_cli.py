"""`qrb workspace DIR [--profile tiny] [-S key=value ...]`: create or refresh a scratch DVC workspace."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from qrb import workspace
from qrb.io import setup_logging


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["train.lora.r=4"] -> {"train": {"lora": {"r": 4}}}; values parsed as YAML, like `dvc exp run -S`."""
    out: dict[str, Any] = {}
    for text in items:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SystemExit(f"qrb workspace: -S takes key=value, got {text!r}")
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir")
    ap.add_argument("--profile", default="tiny", help="profile name in profiles/ or a YAML path; '' for none")
    ap.add_argument("-S", "--set", action="append", default=[], help="param override key=value")
    args = ap.parse_args(argv)
    print(workspace.prepare(args.dir, args.profile or None, overrides=parse_overrides(args.set) or None))


if __name__ == "__main__":
    main()
