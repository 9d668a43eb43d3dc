"""`qrb workspace DIR [--profile tiny] [-S key=value ...]`: create or refresh a scratch DVC workspace."""

from __future__ import annotations

import argparse

from qrb import workspace
from qrb.io import setup_logging
from qrb.params import nested, parse_set


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dir")
    ap.add_argument("--profile", default="tiny", help="profile name in profiles/ or a YAML path; '' for none")
    ap.add_argument("-S", "--set", action="append", default=[], help="param override key=value")
    args = ap.parse_args(argv)
    try:
        overrides = nested(parse_set(args.set))
    except ValueError as e:
        raise SystemExit(f"qrb workspace: {e}") from None
    print(workspace.prepare(args.dir, args.profile or None, overrides=overrides or None))


if __name__ == "__main__":
    main()
