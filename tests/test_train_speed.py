"""The train stage's CPU speed path keeps the math: trl's loss with lm_head on the labelled positions only (trl's fused
head scores every position on a CPU), fused AdamW, and bf16 autocast on a CPU (`bf16_cpu`) with fp32 attention."""

from __future__ import annotations

import pytest
import torch

from helpers import base_of, cpu_recipe, qa_rows


@pytest.fixture(scope="module")
def dataset(corpus_dir):
    from datasets import Dataset, DatasetDict

    rows = qa_rows(corpus_dir)
    held_out = {r["doi"] for r in rows[-8:]}
    return DatasetDict(train=Dataset.from_list([r for r in rows if r["doi"] not in held_out][:16]),
                       eval=Dataset.from_list([r for r in rows if r["doi"] in held_out][:4]))


def test_the_loss_is_trls_with_lm_head_on_the_labelled_positions_only(tiny_model_dir, dataset, tmp_path):
    """Same value and same gradient as trl's fused-head loss (which scores every position on a CPU)."""
    from trl import SFTTrainer

    from qrb.model import load_tokenizer
    from stages.train.trainer import build_model, build_trainer, prepare_tokenizer

    p = cpu_recipe()
    tok, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    model = build_model(base_of(tiny_model_dir), p, tok, "cpu")
    trainer = build_trainer(base_of(tiny_model_dir), p, model, tok, dataset, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(6)])
    model = trainer.model.eval()
    for n_items in (None, torch.tensor(123)):
        grads = []
        for fn in (type(trainer).compute_loss, SFTTrainer.compute_loss):
            model.zero_grad()
            loss = fn(trainer, model, dict(batch), num_items_in_batch=n_items)
            loss.backward()
            grads.append((loss.detach(), [t.grad.clone() for t in model.parameters() if t.requires_grad]))
        assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_the_fast_path_trains_the_same_adapter_as_trls_loss_and_unfused_adamw(tiny_model_dir, dataset):
    """Without dropout (its masks come from other random draws now: see the next test), the same adapter."""
    import dataclasses

    from helpers import legacy_train_path
    from stages.train.trainer import train

    ds = dataset
    p = cpu_recipe(epochs=1.0, batch_size=4, checkpoint_steps=0, emissions_country=None)
    p = dataclasses.replace(p, lora=dataclasses.replace(p.lora, dropout=0.0))
    with legacy_train_path():
        before, _, m_before, h_before = train(base_of(tiny_model_dir), p, ds, "cpu")
    after, _, m_after, h_after = train(base_of(tiny_model_dir), p, ds, "cpu")
    assert any("mean_token_accuracy" in h for h in h_before) and not any("mean_token_accuracy" in h for h in h_after)
    a, b = ({n: t.detach() for n, t in m.named_parameters() if t.requires_grad} for m in (before, after))
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-5
    assert min(float(t.abs().max()) for n, t in a.items() if "lora_B" in n) > 1e-4, "B moved from zero"
    assert abs(m_before["train_loss"] - m_after["train_loss"]) < 1e-5 and m_before["eval_ce"] == \
        pytest.approx(m_after["eval_ce"], abs=1e-5)


def test_word_dropout_drops_p_of_the_elements_scales_the_rest_and_is_off_in_eval(tiny_model_dir):
    from qrb.model import load_tokenizer
    from stages.train.trainer import build_model, prepare_tokenizer

    p = cpu_recipe()
    tok, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    drops = [m for m in build_model(base_of(tiny_model_dir), p, tok, "cpu").modules()
             if isinstance(m, torch.nn.Dropout)]
    assert len(drops) == 2 * 7 and all(type(m).__name__ == "WordDropout" and m.p == 0.1 for m in drops)
    drop = drops[0].train()
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    assert abs(float((y == 0).float().mean()) - 0.1) < 0.002 and y.unique().tolist() == pytest.approx([0, 1 / 0.9])
    assert torch.equal(x.grad, y.detach()), "the gradient is the mask, scaled"
    torch.manual_seed(0)
    assert torch.equal(drop(x), y), "the global RNG draws it: seeded runs repeat"
    assert drop.eval()(x) is x


def test_bf16_cpu_autocasts_on_a_cpu_with_fp32_attention_and_masters(tiny_model_dir, dataset):
    from qrb.model import require_hardware
    from stages.train.trainer import train

    assert require_hardware("m", "bf16_cpu") in ("cpu", "cuda")  # evaluate reads the adapter's precision too
    ds = {"train": dataset["train"].select(range(8)), "eval": dataset["eval"]}
    runs = {prec: train(base_of(tiny_model_dir), cpu_recipe(precision=prec, epochs=1.0, batch_size=4,
                                                             checkpoint_steps=0, emissions_country=None), ds, "cpu")
            for prec in ("bf16_cpu", "fp32")}
    model, _, metrics, _ = runs["bf16_cpu"]
    assert model.config._attn_implementation == "sdpa_fp32"
    assert {t.dtype for t in model.parameters() if t.requires_grad} == {torch.float32}
    assert {t.dtype for t in model.parameters() if not t.requires_grad} == {torch.bfloat16}
    for key in ("train_loss", "eval_ce"):
        assert metrics[key] == pytest.approx(runs["fp32"][2][key], rel=0.02)
