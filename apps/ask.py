"""Ask the fine-tuned model one question; the answer is streamed to the terminal.

    qrb ask "What is a surface code?"            # from a workspace (or repo) root, after the train stage
    qrb ask --base "What is a surface code?"     # the base model alone (no adapter), same template and system prompt
    qrb ask --model artifacts/export/merged "…"   # the merged export instead of base + adapter
    qrb ask --rag "What is a surface code?"      # answer from the papers retrieved from artifacts/index, then a
                                                 # "Sources:" line naming those it cites (title, DOI link); an
                                                 # adapter with a gate answers from memory when sure, citing the
                                                 # paper retrieved that states it

Errors are one line `qrb ask: …` with the kind's exit code (78 configuration, 65 bad input, 2 usage).
"""

from __future__ import annotations

import argparse
import logging
import sys

from apps.bot import add_model_args, app_parser, bot_from_args, run_app
from qrb.retrieval import cite, sources_line


def parser() -> argparse.ArgumentParser:
    ap = app_parser("ask", __doc__)
    ap.add_argument("question", nargs="+", help="the question (several words need no quotes)")
    add_model_args(ap)
    return ap


def ask(args: argparse.Namespace) -> None:
    bot = bot_from_args(args)
    question = [{"role": "user", "content": " ".join(args.question)}]
    conv, shown = bot.ground(question)
    reply, pieces = bot.respond(question, conv, shown)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    cites = cite(reply.text, shown or [])[1]
    sys.stdout.write("\n" + (sources_line(cites) + "\n" if cites else ""))


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_app("qrb ask", lambda: ask(args))


if __name__ == "__main__":
    main()
