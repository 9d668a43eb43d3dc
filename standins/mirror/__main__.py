"""`python -m standins.mirror` (and `qrb mirror`): serve the mirror until killed (see standins/mirror/__init__)."""

from __future__ import annotations

import argparse
import signal

import standins.mirror as mirror_pkg
from qrb.io import setup_logging

from .server import DEFAULT_FAULTS, serve_mirror
from .site import LAYOUTS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qrb mirror", description=mirror_pkg.__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="data/corpus", help="folder with the corpus snapshot (default data/corpus)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8731, help="port (default 8731, what profiles/tiny.yaml names)")
    ap.add_argument("--per-page", type=int, default=5, help="papers per listing page (default 5)")
    ap.add_argument("--faults", action="store_true", help="inject one of each bad case (see FAULT_KINDS)")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="papers", help="where the listing lives (LAYOUTS)")
    ap.add_argument("--no-sitemap", dest="sitemap", action="store_false", help="serve no sitemap")
    ap.add_argument("--crawl-delay", type=float, default=None, help="a Crawl-delay line in robots.txt (seconds)")
    args = ap.parse_args(argv)
    setup_logging()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a clean stop, as Ctrl-C
    try:
        with serve_mirror(args.corpus, port=args.port, host=args.host, per_page=args.per_page,
                          faults=DEFAULT_FAULTS if args.faults else None, layout=args.layout, sitemap=args.sitemap,
                          crawl_delay=args.crawl_delay) as m:
            print(f"standins.mirror: serving {len(m.papers)} papers at {m.start_url} (Ctrl-C to stop)", flush=True)
            for kind, path in sorted(m.fault_paths().items()):
                print(f"standins.mirror: fault {kind}: {m.url}{path}", flush=True)
            signal.pause()
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as exc:  # FileNotFoundError included
        raise SystemExit(f"standins.mirror: {exc}") from None


if __name__ == "__main__":
    main()
