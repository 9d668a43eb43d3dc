"""The clean pairs in the format other trainers read: OpenAI chat fine-tuning JSON Lines, one conversation a line,
`{"messages": [system, user, assistant]}` with the system prompt train uses. OpenAI's fine-tuning API, trl's
SFTTrainer, LLaMA-Factory (`formatting: sharegpt` with OpenAI tags) and axolotl (`type: chat_template`) load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qrb.io import write_jsonl


def chat_rows(rows: list[dict[str, Any]], system_prompt: str) -> list[dict[str, Any]]:
    # `messages` alone, as OpenAI's format defines a line; the provenance stays in train.jsonl / eval.jsonl
    return [{"messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": r["question"]},
                          {"role": "assistant", "content": r["answer"]}]} for r in rows]


def write_openai(out_dir: Path, splits: dict[str, list[dict[str, Any]]], system_prompt: str) -> None:
    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", chat_rows(rows, system_prompt))
