"""`qrb ask` / `qrb chat`: base + adapter with the training chat template and system prompt, streaming, limits.

The `adapter_ws` and `bot` fixtures (conftest.py) train a tiny adapter once per session."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ADAPTER_SYSTEM as SYSTEM
from helpers import REPO


def test_bot_uses_the_training_template_and_system_prompt(bot):
    from qrb.model import prompt_messages

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
    from qrb.model import generate_answers

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
    from apps.bot import InputTooLong

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
    history = __import__("apps.chat", fromlist=["chat_loop"]).chat_loop(bot, read=lambda _: next(inputs),
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


def qrb(*args: str, cwd, input: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qrb.cli", *args], cwd=cwd, input=input, capture_output=True,
                          text=True, timeout=timeout, env=env)


def one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"{prog}: "), lines[0]
    return lines[0]


def test_missing_adapter_is_one_clear_line(tmp_path):
    from qrb.errors import EXIT_CONFIG

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for cmd in ("ask", "chat"):
        proc = qrb(cmd, *(["hi"] if cmd == "ask" else []), cwd=tmp_path)
        assert proc.returncode == EXIT_CONFIG  # configuration: a retry cannot fix it
        assert "no adapter in artifacts/train/adapter" in one_line_error(proc, f"qrb {cmd}")
    (tmp_path / "empty").mkdir()
    proc = qrb("ask", "hi", cwd=tmp_path / "empty")
    assert proc.returncode == EXIT_CONFIG and "params.yaml not found" in one_line_error(proc, "qrb ask")


def test_library_errors_are_qrb_errors_not_exits(tmp_path, adapter_ws):
    """bot.py is library code: it raises qrb.errors exceptions; only an app's main() turns them into an exit."""
    from apps.bot import InputTooLong, load_bot
    from qrb.errors import ConfigError, DataError

    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match="no adapter in"):
        load_bot(params_path=tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="neither an adapter"):
        load_bot(tmp_path, params_path=tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_bot(params_path=tmp_path / "missing.yaml")
    bad = yaml.safe_load((adapter_ws / "params.yaml").read_text())
    bad["serve"]["max_new_tokens"] = 0
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="serve.max_new_tokens"):
        load_bot(adapter_ws / "artifacts" / "train" / "adapter", params_path=tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--base"):
        load_bot(adapter_ws / "artifacts" / "train" / "adapter", params_path=adapter_ws / "params.yaml",
                 base_only=True)
    assert issubclass(InputTooLong, DataError) and issubclass(InputTooLong, ValueError)


def test_bad_input_is_one_line_with_its_exit_code(adapter_ws):
    from qrb.errors import EXIT_DATA, EXIT_USAGE

    proc = qrb("ask", "qubit " * 2000, cwd=adapter_ws)
    assert proc.returncode == EXIT_DATA and "serve.max_input_tokens" in one_line_error(proc, "qrb ask")
    proc = qrb("ask", "--max-new-tokens", "0", "hi", cwd=adapter_ws)
    assert proc.returncode == EXIT_USAGE and "--max-new-tokens" in proc.stderr and "Traceback" not in proc.stderr
    proc = qrb("ask", "--base", "--model", "artifacts/train/adapter", "hi", cwd=adapter_ws)
    assert proc.returncode == EXIT_USAGE and "not allowed with" in proc.stderr


@pytest.mark.parametrize("cmd", ["ask", "chat", "serve"])
def test_help_is_qrbs_and_explains_every_option(cmd, tmp_path):
    proc = qrb(cmd, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: qrb {cmd} "), proc.stdout[:200]
    ap = importlib.import_module(f"apps.{cmd}").parser()
    assert ap.prog == f"qrb {cmd}"
    for action in ap._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help != argparse.SUPPRESS, f"qrb {cmd}: {name} has no help text"
        assert all(opt in proc.stdout for opt in action.option_strings)
    assert "--base" in proc.stdout


def test_base_bot_is_the_base_alone_with_the_same_template_and_prompt(base_bot, bot):
    """`--base`: base.model without the adapter, the training chat template and system prompt; its answer is the
    one evaluate scores as "base" (the adapter disabled)."""
    conv = [{"role": "user", "content": "What does the paper 'Quantum error correction' say?"}]
    assert type(base_bot.model).__name__ == "LlamaForCausalLM"  # no PEFT wrapper
    assert base_bot.tokenizer.pad_token is None  # the base's own tokenizer (train adds <|pad|> to its copy)
    assert base_bot.system_prompt == bot.system_prompt == SYSTEM
    assert base_bot.prompt_ids(conv) == bot.prompt_ids(conv)  # same template, same system prompt, same tokens
    assert "base" in base_bot.source and "no adapter" in base_bot.source
    fine_tuned = bot.generate(conv, max_new_tokens=24)
    with bot.model.disable_adapter():
        evaluate_base = bot.generate(conv, max_new_tokens=24)
    reply = base_bot.generate(conv, max_new_tokens=24)
    assert reply.text == evaluate_base.text and reply.text
    assert reply.text != fine_tuned.text  # the adapter changes this answer: --base really leaves it out


def test_base_without_a_pad_token_generates_and_streams(base_bot):
    """The tiny base has no pad token (SmolLM2's pad is its eos): generation is told one, never guesses, and
    streaming gives the same text, token count and finish reason as generate()."""
    assert base_bot.pad_token_id is not None and base_bot.pad_token_id in base_bot.eos_token_ids
    conv = [{"role": "user", "content": "What is a qubit?"}]
    reply = base_bot.generate(conv, max_new_tokens=20)
    streamed, pieces = base_bot.stream(conv, max_new_tokens=20)
    chunks = list(pieces)
    assert reply.text and "".join(chunks).strip() == reply.text == streamed.text
    assert (streamed.completion_tokens, streamed.finish_reason) == (reply.completion_tokens, reply.finish_reason)
    assert base_bot.lock.acquire(timeout=5)
    base_bot.lock.release()


@pytest.mark.slow
def test_qrb_ask_and_chat_with_base_cli(adapter_ws, base_bot):
    q = "What is a qubit?"
    proc = qrb("ask", "--base", "--max-new-tokens", "12", q, cwd=adapter_ws)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == base_bot.generate([{"role": "user", "content": q}], max_new_tokens=12).text
    proc = qrb("chat", "--base", "--max-new-tokens", "8", cwd=adapter_ws, input=f"{q}\n/exit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no adapter" in proc.stdout.splitlines()[0] and proc.stdout.split("bot> ")[1].strip()


def test_serve_section_loads_in_both_profiles(tmp_path):
    from apps.bot import load_serve_params
    from flows.workspace import profile_params

    for profile, max_new in ((None, 512), ("tiny", 64)):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(profile_params(profile, REPO)))
        base, p = load_serve_params(tmp_path / "params.yaml")
        assert p.host == "127.0.0.1" and p.max_new_tokens == max_new and base.system_prompt


# ---- the real model: SmolLM2 (tied embeddings; the adapter trains an untied copy of the input embedding) ----------

def build_smol_workspace(ws: Path, smol_model_dir: Path) -> Path:
    """A SmolLM2 adapter (2 steps on 4 pairs: enough to change its answers) and its merged and GGUF exports, made by
    the train and export stages' own cores (~30 s)."""
    from datasets import Dataset, DatasetDict

    from flows.workspace import profile_params
    from qrb.params import load_params
    from stages.export import ExportParams, export
    from stages.train import BASE_KEYS, TrainParams
    from stages.train.run import save_adapter
    from stages.train.trainer import train

    params = profile_params("tiny", REPO, overrides={"base": {"model": str(smol_model_dir), "max_length": 96,
                                                              "system_prompt": SYSTEM}})
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base, p = load_params("train", TrainParams, BASE_KEYS, ws / "params.yaml")
    assert "embed_tokens" in p.lora.modules_to_save  # the recipe: the input embedding trained, lm_head frozen
    p = dataclasses.replace(p, epochs=1.0, batch_size=2, learning_rate=1e-3, checkpoint_steps=0,
                            emissions_country=None, neftune_noise_alpha=None)
    rows = [{"question": f"What does paper {i} report?",
             "answer": f"Paper {i} reports a surface code threshold of {i} percent."} for i in range(4)]
    model, tokenizer, _, _ = train(base, p, DatasetDict(train=Dataset.from_list(rows)), "cpu")
    save_adapter(model, tokenizer, p, ws / "artifacts" / "train" / "adapter")
    _, ep = load_params("export", ExportParams, (), ws / "params.yaml")
    export(base, ep, [], "cpu", ws / "artifacts" / "train" / "adapter", ws / "no-card", ws / "artifacts" / "export")
    return ws


@pytest.fixture(scope="module")
def smol_ws(tmp_path_factory, smol_model_dir):
    ws = build_smol_workspace(tmp_path_factory.mktemp("smol-ws"), smol_model_dir)
    yield ws
    shutil.rmtree(ws, ignore_errors=True)  # ~1 GB of exports: not kept among pytest's last three temp dirs


SMOL_Q = "What does paper 2 report?"


@pytest.mark.slow
def test_smol_adapter_merged_and_base_answer(smol_ws, smol_model_dir):
    """`qrb ask` on the real tied-embedding model: the adapter, its merged export, and `--base`; the GGUF is for
    Ollama and llama.cpp, and `qrb ask` says so in one line."""
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(smol_model_dir).pad_token == AutoTokenizer.from_pretrained(
        smol_model_dir).eos_token  # the base pads with eos: --base must generate right with it
    answers = {}
    for name, args in (("adapter", []), ("merged", ["--model", "artifacts/export/merged"]),
                       ("base", ["--base"])):
        proc = qrb("ask", "--max-new-tokens", "8", *args, SMOL_Q, cwd=smol_ws, timeout=300)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-2000:]}"
        assert proc.stderr.strip() == "", f"{name}: a terminal answer, no library noise: {proc.stderr[-2000:]}"
        answers[name] = proc.stdout.strip()
        assert len(answers[name].split()) >= 3, (name, answers[name])
    assert answers["merged"] == answers["adapter"], answers  # the merge (an untied lm_head) loads as trained
    assert "Paper 2" in answers["adapter"] and answers["base"] != answers["adapter"], answers
    from qrb.errors import EXIT_CONFIG

    proc = qrb("ask", "--model", "artifacts/export/gguf", SMOL_Q, cwd=smol_ws, timeout=300)
    assert proc.returncode == EXIT_CONFIG and "holds a GGUF: run it with Ollama" in one_line_error(proc, "qrb ask")


@pytest.mark.slow
def test_smol_base_bot_is_evaluates_base_and_streams_to_eos(smol_ws):
    """In process: SmolLM2's --base (pad = eos) answers what evaluate calls "base", stops at its end-of-turn, and
    streams the same text; chat loads the merged export."""
    from apps.bot import load_bot

    conv = [{"role": "user", "content": "What is 2 + 2? Answer with a number only."}]
    cwd = os.getcwd()
    os.chdir(smol_ws)
    try:
        base = load_bot(base_only=True, max_new_tokens=24)
        tuned = load_bot(max_new_tokens=24)
    finally:
        os.chdir(cwd)
    assert base.tokenizer.pad_token_id == base.tokenizer.eos_token_id and base.pad_token_id in base.eos_token_ids
    assert base.prompt_ids(conv) == tuned.prompt_ids(conv)
    reply = base.generate(conv)
    with tuned.model.disable_adapter():
        assert reply.text == tuned.generate(conv).text
    streamed, pieces = base.stream(conv)
    assert "".join(pieces).strip() == reply.text == streamed.text and reply.text
    assert reply.finish_reason == streamed.finish_reason == "stop" and reply.completion_tokens < 24
    assert "4" in reply.text  # a real pretrained model: it answers
    proc = qrb("chat", "--model", "artifacts/export/merged", "--max-new-tokens", "8", cwd=smol_ws,
               input=f"{SMOL_Q}\n/exit\n", timeout=300)
    assert proc.returncode == 0 and proc.stdout.split("bot> ")[1].strip(), proc.stderr[-2000:]
