"""Train on the tiny Llama: an empty eval split reports no eval CE (never 0), and DoRA is not LoRA."""

from __future__ import annotations

from helpers import qa_rows, split_rows, train_adapter


def test_an_empty_eval_split_reports_no_eval_ce(tiny_model_dir, corpus_dir, tmp_path):
    train_rows, _ = split_rows(qa_rows(corpus_dir), 8, 0)
    _, _, metrics = train_adapter(tiny_model_dir, train_rows, [], tmp_path / "a", epochs=1.0)
    assert metrics["eval_ce"] is None and metrics["eval_tokens"] == 0


def test_dora_trains_its_magnitude_vectors_and_ends_elsewhere_than_lora(tiny_model_dir, corpus_dir, tmp_path):
    """The same seed, data and recipe: DoRA's per-column magnitudes are trained (they start at the base weight's
    column norms) and saved with the adapter, and its LoRA weights end apart from LoRA's."""
    import torch
    from safetensors.torch import load_file

    train_rows, eval_rows = split_rows(qa_rows(corpus_dir), 16, 8)
    out = {}
    for method in ("lora", "dora"):
        model, _, metrics = train_adapter(tiny_model_dir, train_rows, eval_rows, tmp_path / method, method=method,
                                          epochs=1.0, learning_rate=3e-3)
        out[method] = ({k: v.detach().clone() for k, v in model.named_parameters() if ".lora_" in k}, metrics)
        if method == "dora":
            mags = {k: p for k, p in model.named_parameters() if "lora_magnitude_vector" in k}
            assert mags and all(p.requires_grad for p in mags.values())
            for name, mag in mags.items():
                layer = model.get_submodule(name.split(".lora_magnitude_vector")[0])
                start = torch.linalg.norm(layer.base_layer.weight.detach().float(), dim=1)
                assert not torch.allclose(mag.detach().float(), start, atol=1e-6), name
            saved = load_file(tmp_path / method / "adapter_model.safetensors")
            assert sum("lora_magnitude_vector" in k for k in saved) == len(mags)
    (lora, lora_m), (dora, dora_m) = out["lora"], out["dora"]
    assert set(dora) - set(lora) and set(lora) <= set(dora)
    moved = [k for k in lora if "lora_B" in k and not torch.allclose(lora[k], dora[k], atol=1e-6)]
    assert len(moved) == sum("lora_B" in k for k in lora), moved
    assert abs(lora_m["eval_ce"] - dora_m["eval_ce"]) > 1e-4, (lora_m["eval_ce"], dora_m["eval_ce"])
