"""Chat with the fine-tuned model in the terminal (streaming; /reset clears the history, /exit or Ctrl-D quits).

    qrb chat                                  # from a workspace (or repo) root, after the train stage
    qrb chat --base                           # the base model alone (no adapter), same template and system prompt
    qrb chat --model artifacts/export/merged  # the merged export
    qrb chat --rag                            # answers from the papers retrieved, a "Sources:" line for those cited

Old turns are dropped when the conversation outgrows `serve.max_input_tokens`. Ctrl-C stops the answer being
written. Errors are one line `qrb chat: …` with the kind's exit code (78 configuration, 2 usage).
"""

from __future__ import annotations

import argparse
import logging
import sys

from apps.bot import Bot, InputTooLong, add_model_args, app_parser, bot_from_args, run_app
from qrb.retrieval import cite, sources_line


def chat_loop(bot: Bot, read=input, write=sys.stdout.write) -> list[dict[str, str]]:
    """Interactive loop; returns the history. `read` raises EOFError to end (Ctrl-D)."""
    history: list[dict[str, str]] = []
    write(f"Quantum Research Bot ({bot.source}). /reset clears the conversation, /exit quits.\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return history
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return history
        if line == "/reset":
            history = []
            write("(conversation cleared)\n")
            continue
        history = [*history, {"role": "user", "content": line}]
        conv, shown = bot.ground(history)  # history keeps the plain question; only this turn carries passages
        try:
            conv = bot.fit_history(conv)
        except InputTooLong as e:
            write(f"(too long: {e})\n")
            history = []
            continue
        history = history[len(history) - len(conv):]
        write("bot> ")
        reply, pieces = bot.respond(history, conv, shown)
        try:
            for piece in pieces:
                write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.close()
            write(" (interrupted)")
        cites = cite(reply.text, shown or [])[1]
        write("\n" + (sources_line(cites) + "\n" if cites else ""))
        history.append({"role": "assistant", "content": reply.text})


def parser() -> argparse.ArgumentParser:
    ap = app_parser("chat", __doc__)
    add_model_args(ap)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_app("qrb chat", lambda: chat_loop(bot_from_args(args)))


if __name__ == "__main__":
    main()
