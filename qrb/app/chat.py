"""`qrb chat`: an interactive terminal chat with the fine-tuned model (streaming; /reset clears the history,
/exit or Ctrl-D quits). Old turns are dropped when the conversation outgrows `serve.max_input_tokens`."""

from __future__ import annotations

import argparse
import logging
import sys

from qrb.app.bot import Bot, InputTooLong, add_model_args, bot_from_args


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
        try:
            history = bot.fit_history([*history, {"role": "user", "content": line}])
        except InputTooLong as e:
            write(f"(too long: {e})\n")
            history = []
            continue
        write("bot> ")
        reply, pieces = bot.stream(history)
        try:
            for piece in pieces:
                write(piece)
                if hasattr(sys.stdout, "flush"):
                    sys.stdout.flush()
        except KeyboardInterrupt:
            pieces.close()
            write(" (interrupted)")
        write("\n")
        history.append({"role": "assistant", "content": reply.text})


def chat_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="qrb chat", description="Chat with the fine-tuned model (streams)")
    add_model_args(ap)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    chat_loop(bot_from_args(args))


def main(argv: list[str] | None = None) -> None:
    chat_main(argv)


if __name__ == "__main__":
    main()
