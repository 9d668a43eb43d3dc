"""`qrb ask` / `qrb chat`: base + adapter with the training chat template and system prompt, streaming, limits.

The `adapter_ws` and `bot` fixtures (conftest.py) train a tiny adapter once per session."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import ADAPTER_SYSTEM as SYSTEM
from helpers import REPO


def test_bot_uses_the_training_template_and_system_prompt(bot):
    from qrb.chat import prompt_messages

    q = "What is a surface code?"
    expected = bot.tokenizer.apply_chat_template(prompt_messages(SYSTEM, q), tokenize=False, add_generation_prompt=True)
    ids = bot.prompt_ids([{"role": "user", "content": q}])
    assert bot.tokenizer.decode(ids) == expected
    assert SYSTEM in expected and bot.system_prompt == SYSTEM
    # the adapter is loaded (not the bare base), with the tokenizer that carries the added pad token
    assert type(bot.model).__name__ == "PeftModelForCausalLM"
    assert bot.tokenizer.pad_token == "<|pad|>"
    assert bot.limits.max_new_tokens == 64  # profiles/tiny.yaml's serve.max_new_tokens


def test_generate_equals_evaluate_generation_and_stream_equals_generate(bot):
    from qrb.chat import generate_answers

    q = "What does the paper 'Quantum error correction' say?"
    reply = bot.generate([{"role": "user", "content": q}], max_new_tokens=24)
    ref = generate_answers(bot.model, bot.tokenizer, [q], SYSTEM, batch_size=1, max_new_tokens=24)[0]
    assert reply.text == ref and reply.text  # same answer as the evaluate stage's generation, and not empty
    assert reply.completion_tokens >= 1 and reply.prompt_tokens > 10
    assert reply.finish_reason in ("stop", "length")
    streamed, pieces = bot.stream([{"role": "user", "content": q}], max_new_tokens=24)
    chunks = list(pieces)
    assert len(chunks) > 1, "the answer must arrive in pieces"
    assert "".join(chunks).strip() == reply.text == streamed.text
    assert streamed.completion_tokens == reply.completion_tokens and streamed.finish_reason == reply.finish_reason


def test_limits_are_enforced(bot):
    from qrb.app.bot import InputTooLong

    with pytest.raises(InputTooLong, match="limit"):
        bot.prompt_ids([{"role": "user", "content": "qubit " * 2000}])
    with pytest.raises(ValueError, match="max_tokens must be between 1 and 64"):
        bot.generate([{"role": "user", "content": "hi"}], max_new_tokens=65)
    r = bot.generate([{"role": "user", "content": "What is entanglement?"}], max_new_tokens=1)
    assert r.completion_tokens == 1
    # chat drops the oldest turns, never the new question
    long_turn = [{"role": "user", "content": "noise " * 150}, {"role": "assistant", "content": "ok"}]
    history = bot.fit_history(long_turn * 3 + [{"role": "user", "content": "And now?"}])
    assert history[-1]["content"] == "And now?" and len(history) < 7 and len(history) % 2 == 1


def test_closing_a_stream_early_releases_the_model(bot):
    _, pieces = bot.stream([{"role": "user", "content": "Tell me about qubits."}], max_new_tokens=40)
    next(pieces)
    pieces.close()  # a client went away
    assert bot.lock.acquire(timeout=30), "the generation lock must be released"
    bot.lock.release()


def test_chat_loop_keeps_history_and_resets(bot):
    inputs = iter(["What is a qubit?", "And a qutrit?", "/reset", "Hello?", "/exit"])
    out: list[str] = []
    history = __import__("qrb.app.chat", fromlist=["chat_loop"]).chat_loop(bot, read=lambda _: next(inputs),
                                                                        write=out.append)
    text = "".join(out)
    assert "(conversation cleared)" in text and text.count("bot> ") == 3
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hello?"


@pytest.mark.slow
def test_qrb_ask_cli_offline(adapter_ws):
    """`qrb ask` in a workspace, as a user runs it (a fresh process, no network)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "ask", "--max-new-tokens", "12",
                           "What is a qubit?"], cwd=adapter_ws, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "chat", "--max-new-tokens", "8"], cwd=adapter_ws,
                          input="What is a qubit?\n/exit\n", capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bot> " in proc.stdout and proc.stdout.split("bot> ")[1].strip()


def test_missing_adapter_is_one_clear_line(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "qrb.cli", "ask", "hi"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no adapter in artifacts/train/adapter" in proc.stderr.strip().splitlines()[-1]


def test_serve_section_loads_in_both_profiles(tmp_path):
    from flows.workspace import profile_params
    from qrb.app.bot import load_serve_params

    for profile, max_new in ((None, 512), ("tiny", 64)):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(profile_params(profile, REPO)))
        base, p = load_serve_params(tmp_path / "params.yaml")
        assert p.host == "127.0.0.1" and p.max_new_tokens == max_new and base.system_prompt
