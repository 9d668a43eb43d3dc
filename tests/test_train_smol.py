"""The card's recipe on a real, tied model (SmolLM2-135M-Instruct): its own chat template, an added pad token, LoRA+
on attention + MLP, the embedding trained as an untied copy (lm_head frozen); the adapter reloads and exports."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import (
    adapter_qa_rows,
    assert_answer_only_loss_is_exact,
    assert_embedding_trained_and_the_rest_frozen,
    assert_tied_export_is_correct,
    export_adapter,
    split_rows,
    train_adapter,
)

pytestmark = pytest.mark.slow
MAX_LENGTH = 160


@pytest.fixture(scope="module")
def rows(corpus_dir):
    return split_rows(adapter_qa_rows(corpus_dir), 4, 4)


@pytest.fixture(scope="module")
def smol_adapter(smol_model_dir, rows, tmp_path_factory):
    """Two LoRA+ steps (batch 2) on four rows: ~10 s a step on one core."""
    out = tmp_path_factory.mktemp("smol") / "adapter"
    model, tokenizer, metrics = train_adapter(smol_model_dir, rows[0], rows[1], out, max_length=MAX_LENGTH,
                                              epochs=1.0, batch_size=2, learning_rate=1e-3)
    return model, tokenizer, metrics, out


def test_smol_answer_only_loss_is_exact_in_its_own_chat_template(smol_model_dir, rows, tmp_path):
    from qrb.model import load_tokenizer

    assert "<|im_start|>assistant" in load_tokenizer(str(smol_model_dir)).chat_template  # ChatML, the model's own
    assert_answer_only_loss_is_exact(smol_model_dir, rows[0], tmp_path)


def test_smol_trains_an_untied_embedding_copy_with_lm_head_frozen_and_reloads(smol_model_dir, smol_adapter):
    from qrb.model import load_with_adapter

    model, tokenizer, metrics, out = smol_adapter
    assert json.loads((smol_model_dir / "config.json").read_text())["tie_word_embeddings"] is True
    assert metrics["added_tokens"] == 1 and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert metrics["steps"] == 2
    lora_a = {n for n, _ in model.named_parameters() if "lora_A" in n}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert sum(f".{proj}." in n for n in lora_a) == 30, f"LoRA on {proj} of each of the 30 layers"
    assert_embedding_trained_and_the_rest_frozen(model, smol_model_dir, tokenizer)

    reloaded, tok = load_with_adapter(str(smol_model_dir), out)
    ids = tok("What is a qubit and how is it measured?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)
    assert metrics["eval_ce"] > 0


def test_smol_merge_and_gguf_export_keep_the_trained_embedding_and_the_frozen_lm_head(smol_model_dir, smol_adapter,
                                                                                   rows, tmp_path):
    _, _, _, adapter = smol_adapter
    metrics = export_adapter(smol_model_dir, adapter, rows[1], tmp_path / "export", max_length=MAX_LENGTH)
    assert_tied_export_is_correct(smol_model_dir, adapter, tmp_path / "export", metrics)
    assert metrics["size_bytes"]["gguf"] < 0.3 * metrics["size_bytes"]["merged"]  # Q8_0: 8.5 bits vs fp32's 32
