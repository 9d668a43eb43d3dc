"""Train stage on the tiny Llama: the card's recipe is what gets built, adapters learn, bases stay put."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import SYSTEM, base_of, cpu_recipe, qa_rows, recipe
from qrb.errors import ConfigError
from stages.train.lineage import lineage
from stages.train.trainer import build_model, build_optimizer, lora_config, prepare_tokenizer, train


@pytest.fixture(scope="module")
def dataset(corpus_dir):
    from datasets import Dataset, DatasetDict

    rows = qa_rows(corpus_dir)
    held_out = sorted({r["doi"] for r in rows})[:5]
    return DatasetDict(train=Dataset.from_list([r for r in rows if r["doi"] not in held_out]),
                       eval=Dataset.from_list([r for r in rows if r["doi"] in held_out]))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, dataset):
    p = cpu_recipe(epochs=2.0)
    model, tokenizer, metrics, history = train(base_of(tiny_model_dir), p, dataset, "cpu")
    return model, tokenizer, metrics, history


def test_recipe_builds_kaiming_a_zero_b_and_a_real_pad_token(tiny_model_dir):
    from qrb.model import load_tokenizer

    p = cpu_recipe()
    tokenizer, added = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    assert added == 1 and tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token != tokenizer.eos_token
    assert tokenizer.padding_side == "right"
    model = build_model(base_of(tiny_model_dir), p, tokenizer, "cpu")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    a = [t for n, t in model.named_parameters() if "lora_A" in n]
    b = [t for n, t in model.named_parameters() if "lora_B" in n]
    assert a and len(a) == len(b) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert all(torch.count_nonzero(t) == 0 for t in b), "B must start at zero"
    for t in a:  # Kaiming-uniform(a=sqrt(5)) on fan_in: bound = 1/sqrt(fan_in)
        bound = 1 / t.shape[1] ** 0.5
        assert t.abs().max() <= bound + 1e-6 and t.std() > bound / 4
    trainable = {n for n, t in model.named_parameters() if t.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert not any("lora" not in n and "modules_to_save" not in n for n in trainable)


def test_answer_only_loss_is_exact_and_the_prompt_is_a_prefix(tiny_model_dir, dataset, tmp_path):
    from helpers import assert_answer_only_loss_is_exact

    assert_answer_only_loss_is_exact(tiny_model_dir, list(dataset["train"].select(range(6))), tmp_path)


def test_on_a_tied_base_the_embedding_copy_trains_and_lm_head_stays_frozen(corpus_dir, dataset, tmp_path):
    """One matrix for embed_tokens and lm_head (SmolLM2's layout): modules_to_save trains a copy of the input
    embedding and lm_head keeps the frozen original, i.e. the adapter unties the model."""
    from helpers import assert_embedding_trained_and_the_rest_frozen, train_adapter
    from standins import tiny_model

    tied = tiny_model.build(corpus_dir, tmp_path / "tied", seed=0, pretrain_steps=20, tie_word_embeddings=True)
    rows = list(dataset["train"].select(range(8)))
    model, tokenizer, _ = train_adapter(tied, rows, rows[:2], tmp_path / "adapter", epochs=1.0, batch_size=4)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert_embedding_trained_and_the_rest_frozen(model, tied, tokenizer)


def test_loraplus_groups_give_b_eight_times_the_lr_and_weight_decay(tiny_model_dir):
    from qrb.model import load_tokenizer

    p = cpu_recipe(learning_rate=1e-4)
    tokenizer, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    model = build_model(base_of(tiny_model_dir), p, tokenizer, "cpu")
    opt = build_optimizer(model, p)
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(t): n for n, t in model.named_parameters()}
    lr_of = {}
    for g in opt.param_groups:
        for t in g["params"]:
            lr_of[names[id(t)]] = (g["lr"], g["weight_decay"])
    b = {(round(lr, 10), wd) for n, (lr, wd) in lr_of.items() if "lora_B" in n}
    a = {(round(lr, 10), wd) for n, (lr, wd) in lr_of.items() if "lora_A" in n}
    assert b == {(8e-4, 0.01)} and a == {(1e-4, 0.01)}
    assert build_optimizer(model, cpu_recipe(method="lora")) is None  # Trainer's AdamW


def test_bf16_keeps_every_trainable_tensor_in_fp32_so_a_decay_step_moves_the_embedding(tiny_model_dir):
    """The frozen base in bf16, every trainable tensor (LoRA A/B and the embedding copy) an fp32 master: one AdamW
    step at lr 1e-4, wd 0.01 under bf16 autocast changes every element of the embedding copy (in bf16, w * 1e-6 is
    below half an ulp: 0 of 65,600 changed)."""
    from qrb.model import load_tokenizer

    p = recipe(precision="bf16", learning_rate=1e-4, weight_decay=0.01)
    tokenizer, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    model = build_model(base_of(tiny_model_dir), p, tokenizer, "cpu")
    trainable = {n: t for n, t in model.named_parameters() if t.requires_grad}
    frozen = {n: t for n, t in model.named_parameters() if not t.requires_grad}
    assert {t.dtype for t in trainable.values()} == {torch.float32}, "trainable tensors need an fp32 master"
    assert {t.dtype for t in frozen.values()} == {torch.bfloat16}, "the frozen base stays in bf16"
    emb = next(t for n, t in trainable.items() if "embed_tokens.modules_to_save" in n)
    before = emb.detach().clone()
    opt = build_optimizer(model, p)
    ids = tokenizer("What is a qubit?", return_tensors="pt")["input_ids"]
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = int((emb.detach() != before).sum())
    assert changed == emb.numel(), f"{changed} of {emb.numel()} embedding elements changed"


def test_qlora_keeps_fp32_masters_although_trl_casts_a_4bit_models_adapters_to_bf16(tiny_model_dir, dataset,
                                                                                    tmp_path):
    """SFTTrainer casts every trainable tensor of a model that says `is_loaded_in_4bit` to bf16 (the embedding
    copy too); the stage's trainer puts the fp32 masters back. (nf4 itself needs CUDA: the flag stands in.)"""
    import dataclasses

    from qrb.model import load_tokenizer
    from stages.train.trainer import build_trainer

    p = recipe(precision="bf16")
    tokenizer, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    model = build_model(base_of(tiny_model_dir), p, tokenizer, "cpu")
    model.base_model.model.is_loaded_in_4bit = True  # what trl looks at
    ds = {"train": dataset["train"].select(range(8))}
    build_trainer(base_of(tiny_model_dir), dataclasses.replace(p, precision="fp32"), model, tokenizer, ds, tmp_path)
    assert {t.dtype for t in model.parameters() if t.requires_grad} == {torch.float32}


def test_card_recipe_on_llama_3_1_8b_shape_trains_546m_params():
    """On the meta device (no weights): ~21M LoRA + 525M embedding, as the card says (~550M)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg), lora_config(recipe()))
    lora = sum(t.numel() for n, t in model.named_parameters() if t.requires_grad and "lora_" in n)
    total = sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert lora == 20_971_520
    assert total - lora == 128256 * 4096
    assert 540e6 < total < 552e6


def test_adapter_moves_and_base_weights_do_not(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tokenizer, metrics, _ = trained
    original = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    vocab = original["model.embed_tokens.weight"].shape[0]
    params = dict(model.named_parameters())
    for name, t in params.items():
        if "lora_B" in name:
            assert torch.count_nonzero(t) > 0, f"{name} never moved from zero"
    checked = 0
    for name, before in original.items():
        if name == "model.embed_tokens.weight":
            key = "base_model.model.model.embed_tokens.original_module.weight"
            after = params[key][:vocab]
            trained_copy = params["base_model.model.model.embed_tokens.modules_to_save.default.weight"][:vocab]
            assert not torch.allclose(trained_copy, before), "the embedding copy must train"
        elif name == "lm_head.weight":
            after = params["base_model.model.lm_head.weight"][:vocab]
        else:
            parts = name.rsplit(".", 1)
            key = f"base_model.model.{parts[0]}.base_layer.{parts[1]}"
            after = params.get(key, params.get(f"base_model.model.{name}"))
        assert torch.equal(after.detach(), before), f"base weight {name} changed"
        checked += 1
    assert checked == len(original)
    assert metrics["trainable_params"] < metrics["total_params"] and metrics["steps"] > 0


def test_fine_tuning_lowers_eval_cross_entropy(trained, dataset):
    from qrb.model import token_weighted_ce

    model, tokenizer, metrics, history = trained
    rows = list(dataset["eval"])
    with model.disable_adapter():
        base_ce = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=8, max_length=192)
    tuned_ce = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=8, max_length=192)
    assert tuned_ce["cross_entropy"] < base_ce["cross_entropy"] - 0.05
    assert tuned_ce["tokens"] == base_ce["tokens"] > 0
    assert metrics["eval_ce"] == pytest.approx(tuned_ce["cross_entropy"], rel=1e-5)
    assert any("loss" in h for h in history) and any("eval_loss" in h for h in history)


def test_token_weighted_ce_does_not_depend_on_batch_size(trained, dataset):
    from qrb.model import token_weighted_ce

    model, tokenizer, _, _ = trained
    rows = list(dataset["eval"])
    one = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=1, max_length=192)
    eight = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=8, max_length=192)
    assert one["tokens"] == eight["tokens"]
    assert one["cross_entropy"] == pytest.approx(eight["cross_entropy"], rel=1e-4)


def test_training_is_deterministic(tiny_model_dir, dataset, trained):
    small = {k: dataset[k].select(range(16)) for k in ("train", "eval")}
    p = cpu_recipe(epochs=1.0)
    first = train(base_of(tiny_model_dir), p, small, "cpu")[0]
    second = train(base_of(tiny_model_dir), p, small, "cpu")[0]
    a = {n: t for n, t in first.named_parameters() if t.requires_grad}
    b = {n: t for n, t in second.named_parameters() if t.requires_grad}
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_gradient_checkpointing_is_the_params_choice_and_changes_memory_not_the_result(tiny_model_dir, dataset,
                                                                                       tmp_path, repo):
    from flows.workspace import profile_params
    from stages.train.trainer import sft_config

    for on in (True, False):  # trl's SFTConfig would turn it on whatever the recipe says
        assert sft_config(base_of(tiny_model_dir), cpu_recipe(gradient_checkpointing=on), str(tmp_path),
                          True).activation_checkpointing is on
    assert recipe().gradient_checkpointing is True  # flagship: 8B activations on one GPU
    assert profile_params("tiny", repo)["train"]["gradient_checkpointing"] is False  # CPU: speed is measured
    small = {k: dataset[k].select(range(16)) for k in ("train", "eval")}
    runs = {on: train(base_of(tiny_model_dir), cpu_recipe(epochs=1.0, gradient_checkpointing=on), small, "cpu")[0]
            for on in (True, False)}
    assert runs[True].base_model.model.is_activation_checkpointing
    assert not runs[False].base_model.model.is_activation_checkpointing
    a, b = ({n: t for n, t in m.named_parameters() if t.requires_grad} for m in (runs[True], runs[False]))
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a), "recomputation must not change the adapter"


def test_qlora_on_cpu_is_a_clear_error():
    from qrb.model import require_hardware

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="precision 'nf4' for m needs a CUDA GPU"):
        require_hardware("m", "nf4")


def test_training_energy_is_metered_offline_for_the_card(trained):
    """codecarbon's offline tracker (no network) meters the run; lineage.json and the card carry it."""
    _, _, metrics, _ = trained
    em = metrics["emissions"]
    assert em["country"] == "USA" and em["energy_kwh"] > 0 and em["co2_kg"] > 0
    lin = lineage(base_of(Path("unused")), cpu_recipe(), metrics)
    assert lin["emissions"] == em
