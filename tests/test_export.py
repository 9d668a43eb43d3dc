"""Export: the merge is exact (same eval CE and logits as base + adapter), the int8 variant is smaller and its
metric drop is reported; no 4-bit merge, no LoReFT merge, no push without a token."""

from __future__ import annotations

import json

import pytest

from qrb.errors import ConfigError


@pytest.fixture(scope="module")
def exported(adapter_ws, tmp_path_factory):
    from qrb.io import read_jsonl
    from qrb.params import load_params
    from stages import export as ex

    base, p = load_params(ex.SECTION, ex.PARAMS_CLASS, ex.BASE_KEYS, adapter_ws / "params.yaml")
    rows = list(read_jsonl(adapter_ws / "artifacts" / "validate" / "eval.jsonl"))[:8]
    card = tmp_path_factory.mktemp("card")
    (card / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# card\n")
    out = tmp_path_factory.mktemp("export")
    metrics = ex.export(base, p, rows, "cpu", adapter_dir=adapter_ws / "artifacts" / "train" / "adapter",
                        card_dir=card, out=out)
    return base, p, rows, out, metrics


def test_merge_is_exact_and_loads_without_peft(exported, adapter_ws):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qrb.chat import load_causal_lm, load_tokenizer, resize_for_tokenizer

    base, p, rows, out, m = exported
    assert p.merge_precision == "fp32"  # profiles/tiny.yaml: CPU
    assert abs(m["merge_ce_delta"]) < 1e-4 and m["eval_ce"]["merged"] > 0 and m["eval_tokens"] > 0
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = adapter_ws / "artifacts" / "train" / "adapter"
    tok = load_tokenizer(str(adapter))
    ref = load_causal_lm(base["model"])
    resize_for_tokenizer(ref, tok)
    ref = PeftModel.from_pretrained(ref, str(adapter)).eval()
    ids = tok("What is a qubit?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-4)
        with ref.disable_adapter():  # the adapter did change the model: the comparison means something
            assert not torch.allclose(merged(ids).logits, ref(ids).logits, atol=1e-3)
    assert (out / "adapter" / "README.md").exists() and (out / "adapter" / "adapter_config.json").exists()


def test_int8_is_smaller_int8_on_disk_and_its_drop_is_reported(exported):
    from safetensors import safe_open

    from qrb.int8 import QUANT_FILE, QUANT_METHOD

    _, _, _, out, m = exported
    sizes = m["size_bytes"]
    assert sizes["int8"] < 0.5 * sizes["merged"] and m["int8_size_ratio"] == sizes["int8"] / sizes["merged"]
    assert m["int8_ce_drop"] == pytest.approx(m["eval_ce"]["int8"] - m["eval_ce"]["merged"])
    assert abs(m["int8_ce_drop"]) < 0.05, "per-channel int8 should barely move eval CE"
    with safe_open(str(out / "int8" / "model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    int8 = [k for k, d in dtypes.items() if d == "I8"]
    assert len(int8) == m["int8_modules"] and any("lm_head" in k for k in int8)
    assert any("embed_tokens" in k for k in int8) and any("q_proj" in k for k in int8)
    meta = json.loads((out / "int8" / QUANT_FILE).read_text())
    assert meta["method"] == QUANT_METHOD and len(meta["modules"]) == m["int8_modules"]


@pytest.fixture(scope="module")
def tied_tiny_dir(tmp_path_factory, corpus_dir):
    from qrb.offline import tiny_model

    return tiny_model.build(corpus_dir, tmp_path_factory.mktemp("tied-tiny"), seed=0, pretrain_steps=40,
                            tie_word_embeddings=True)


def test_merge_and_int8_of_a_tied_base_keep_the_trained_embedding_and_the_frozen_lm_head(tied_tiny_dir, corpus_dir,
                                                                                          tmp_path):
    """A tied base (one matrix for embed_tokens and lm_head, as SmolLM2): the adapter trained a copy of the
    embedding, so the merge is an untied model; saved with the base's tie flag, a reload would tie lm_head to the
    trained embedding."""
    from helpers import adapter_qa_rows, assert_tied_export_is_correct, export_adapter, split_rows, train_adapter

    assert json.loads((tied_tiny_dir / "config.json").read_text())["tie_word_embeddings"] is True
    train_rows, eval_rows = split_rows(adapter_qa_rows(corpus_dir), 16, 8)
    train_adapter(tied_tiny_dir, train_rows, eval_rows, tmp_path / "adapter", epochs=1.0, learning_rate=3e-3,
                  batch_size=4)
    metrics = export_adapter(tied_tiny_dir, tmp_path / "adapter", eval_rows, tmp_path / "export")
    assert_tied_export_is_correct(tied_tiny_dir, tmp_path / "adapter", tmp_path / "export", metrics)


def test_int8_of_a_model_that_is_still_tied_saves_and_reloads(tied_tiny_dir, tmp_path):
    """No trained embedding (e.g. `modules_to_save: []`): the merge stays tied, one matrix in two modules."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrb.int8 import load_exported, quantize_int8, save_int8

    model = AutoModelForCausalLM.from_pretrained(tied_tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tied_tiny_dir)
    ids = tok("What is a qubit and how is it measured?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(model(ids).logits, -1)
    modules = quantize_int8(model)
    assert {"model.embed_tokens", "lm_head"} <= modules.keys()
    save_int8(model, tok, modules, "fp32", tmp_path / "int8")
    int8, _ = load_exported(tmp_path / "int8")
    with torch.no_grad():
        got = torch.log_softmax(int8(ids).logits, -1)
    assert type(int8.lm_head).__name__ == "Int8Linear" and type(int8.model.embed_tokens).__name__ == "Int8Embedding"
    assert (want.exp() * (want - got)).sum(-1).mean() < 0.01, "int8 should barely move the next-token distribution"


def test_quantize_rows_error_is_bounded():
    import torch

    from qrb.int8 import _quantize_rows

    w = torch.randn(16, 64) * torch.linspace(0.01, 3, 16)[:, None]  # rows of very different scales
    q, s = _quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (16,)
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)  # at most half a step, per row


def test_int8_export_serves_through_ask(exported, adapter_ws, monkeypatch):
    from qrb.app.bot import load_bot

    _, _, _, out, _ = exported
    monkeypatch.chdir(adapter_ws)
    bot = load_bot(out / "int8", max_new_tokens=8)
    assert type(bot.model.lm_head).__name__ == "Int8Linear"
    reply = bot.generate([{"role": "user", "content": "What is a qubit?"}])
    assert reply.completion_tokens >= 1


def test_no_4bit_merge_no_loreft_merge_no_push_without_token(tmp_path, monkeypatch):
    from qrb.params import build
    from stages import export as ex

    base = {"model": "m", "system_prompt": "s", "hf_offline": False}
    good = {"merge_precision": "bf16", "quantize": "int8", "eval_batch_size": 8,
            "hub_repo_id": "someone/qrb", "hub_token_env": "QRB_TEST_NO_SUCH_TOKEN", "hub_private": True}
    with pytest.raises(ValueError, match=r"`export.merge_precision` must be one of 'bf16', 'fp16', 'fp32'"):
        build(ex.ExportParams, {**good, "merge_precision": "nf4"}, "export")
    p = build(ex.ExportParams, good, "export")
    monkeypatch.delenv("QRB_TEST_NO_SUCH_TOKEN", raising=False)
    assert ex.push_to_hub(base, p, tmp_path) is None  # no token: nothing is pushed (and nothing is contacted)
    monkeypatch.setenv("QRB_TEST_NO_SUCH_TOKEN", "hf_x")
    assert ex.push_to_hub({**base, "hf_offline": True}, p, tmp_path) is None  # offline profile: never
    (tmp_path / "loreft_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="cannot be merged"):
        ex.load_base_and_adapter(base, p, tmp_path, "cpu")


def test_loreft_adapter_is_exported_as_is_with_the_reason_and_no_merge(tmp_path):
    """A LoReFT experiment must not fail the pipeline at export: the adapter is exported, merge/int8 say why not."""
    from qrb.params import build
    from stages import export as ex

    adapter, card, out = tmp_path / "adapter", tmp_path / "card", tmp_path / "export"
    adapter.mkdir()
    card.mkdir()
    (adapter / "loreft_config.json").write_text("{}")
    (adapter / "loreft_weights.safetensors").write_bytes(b"x" * 100)
    (card / "README.md").write_text("# card\n")
    p = build(ex.ExportParams, {"merge_precision": "fp32", "quantize": "int8", "eval_batch_size": 8,
                                "hub_repo_id": None, "hub_token_env": "HF_TOKEN",
                                "hub_private": True}, "export")
    metrics = ex.export({"model": "m", "system_prompt": "s", "hf_offline": True, "max_length": 64}, p, [], "cpu",
                        adapter_dir=adapter, card_dir=card, out=out)
    assert metrics["skipped"] == ex.LOREFT_NOT_MERGEABLE and metrics["size_bytes"] == {"adapter": 100}
    assert (out / "adapter" / "loreft_config.json").exists() and (out / "adapter" / "README.md").exists()
    for d in ("merged", "int8"):
        assert "cannot be merged" in (out / d / "NOT_EXPORTED.md").read_text()
