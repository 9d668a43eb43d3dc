"""`qrb ask "…"`: one question to the fine-tuned model, the answer streamed to the terminal.

    qrb ask "What is a surface code?"            # from a workspace (or repo) root, after the train stage
    qrb ask --model artifacts/export/merged "…"   # an exported merged (or int8) model instead of base + adapter
"""

from __future__ import annotations

import argparse
import logging
import sys

from qrb.app.bot import InputTooLong, add_model_args, bot_from_args


def ask_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qrb ask", description="Ask the fine-tuned model one question (streams)")
    ap.add_argument("question", nargs="+")
    add_model_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bot = bot_from_args(args)
    try:
        _, pieces = bot.stream([{"role": "user", "content": " ".join(args.question)}])
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except InputTooLong as e:
        raise SystemExit(f"qrb ask: {e}") from None
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> None:
    ask_main(argv)


if __name__ == "__main__":
    main()
