"""Train stage beyond the recipe: native LoReFT, checkpoint/resume equivalence, per-length NEFTune, lineage."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from helpers import SYSTEM, base_of, cpu_recipe, qa_rows
from qrb import loreft
from stages.train.hooks import neftune_per_length
from stages.train.lineage import checkpoint_key, data_fingerprint, lineage
from stages.train.run import save_adapter
from stages.train.trainer import LoreftParams, train


@pytest.fixture(scope="module")
def small(corpus_dir):
    from datasets import Dataset, DatasetDict

    rows = qa_rows(corpus_dir)
    held_out = sorted({r["doi"] for r in rows})[:3]
    train_rows = [r for r in rows if r["doi"] not in held_out][:24]
    eval_rows = [r for r in rows if r["doi"] in held_out][:8]
    return DatasetDict(train=Dataset.from_list(train_rows), eval=Dataset.from_list(eval_rows))


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}


# ---------------------------------------------------------------------------------------------------- LoReFT


def test_loreft_intervention_is_h_plus_rt_of_wh_plus_b_minus_rh():
    torch.manual_seed(0)
    iv = loreft.LoreftIntervention(hidden=16, rank=4, dropout=0.0)
    r = iv.rotation.detach()
    assert torch.allclose(r @ r.T, torch.eye(4), atol=1e-5), "R must have orthonormal rows"
    h = torch.randn(2, 5, 16)
    w, b = iv.source.weight.detach(), iv.source.bias.detach()
    expected = h + (h @ w.T + b - h @ r.T) @ r
    assert torch.allclose(iv(h), expected, atol=1e-5)
    with torch.no_grad():  # W = R, b = 0: the edit vanishes
        iv.source.weight.copy_(r)
        iv.source.bias.zero_()
    assert torch.allclose(iv(h), h, atol=1e-5)
    with torch.no_grad():  # orthonormality survives an update and weight decay of the free parameter
        iv.rotate_raw.add_(0.3 * torch.randn_like(iv.rotate_raw)).mul_(0.99)
    r2 = iv.rotation.detach()
    assert torch.allclose(r2 @ r2.T, torch.eye(4), atol=1e-5) and not torch.allclose(r2, r)


def test_loreft_positions_first_and_last_prompt_tokens_with_padding():
    cfg = loreft.LoreftConfig(hidden_size=8, layers=[0], rank=2, positions="f2+l1", header_ids=[7, 8],
                              pad_token_id=0)
    ids = torch.tensor([[5, 6, 5, 7, 8, 3, 3, 0, 0],    # right padding: prompt = 5 6 5 7 8, answer 3 3
                        [0, 0, 5, 5, 5, 5, 7, 8, 3]])   # left padding (generation)
    mask = loreft.position_mask(ids, (ids != 0).long(), cfg)
    assert mask[0].tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert mask[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 0]
    assert not loreft.position_mask(torch.tensor([[3]]), None, cfg).any()  # a decode step: no edit
    every = loreft.LoreftConfig(hidden_size=8, layers=[0], rank=2, positions="all", pad_token_id=0)
    assert loreft.position_mask(ids, (ids != 0).long(), every).tolist() == (ids != 0).tolist()
    with pytest.raises(ValueError, match="positions"):
        loreft.LoreftConfig(hidden_size=8, layers=[0], positions="middle")


def test_loreft_layers_count_from_the_end_and_default_to_the_last_eight(tiny_model_dir):
    from helpers import recipe
    from qrb.model import load_causal_lm, load_tokenizer
    from stages.train.trainer import loreft_config, prepare_tokenizer

    default = recipe().loreft.layers
    assert loreft.resolve_layers(default, 30) == list(range(22, 30))  # the card's "last 8", on any depth
    assert loreft.resolve_layers(default, 2) == [0, 1]  # fewer than 8 layers: all of them
    assert loreft.resolve_layers((0, -1), 4) == [0, 3] and loreft.resolve_layers((-1, 3), 4) == [3]
    assert loreft.resolve_layers((), 3) == [0, 1, 2]  # [] = every layer
    with pytest.raises(ValueError, match="layer 4 out of range"):
        loreft.resolve_layers((4,), 4)
    with pytest.raises(ValueError, match="no layer"):
        loreft.resolve_layers((-5,), 4)
    p = cpu_recipe(method="loreft")
    tokenizer, _ = prepare_tokenizer(load_tokenizer(str(tiny_model_dir)), p)
    assert loreft_config(p, load_causal_lm(str(tiny_model_dir)), tokenizer).layers == [0, 1]


@pytest.mark.slow
def test_loreft_trains_only_interventions_and_round_trips(tiny_model_dir, small, tmp_path):
    from qrb.model import adapter_kind, load_causal_lm, load_tokenizer, resize_for_tokenizer, token_weighted_ce

    p = cpu_recipe(method="loreft", epochs=2.0, learning_rate=2e-3)
    model, tokenizer, metrics, _ = train(base_of(tiny_model_dir), p, small, "cpu")
    names = [n for n, t in model.named_parameters() if t.requires_grad]
    assert names and all(n.startswith("loreft.") for n in names)
    assert metrics["trainable_params"] == 2 * (2 * 4 * 64 + 4)  # 2 layers x (R + W + b), hidden 64, rank 4
    rows = list(small["eval"])
    tuned = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=4, max_length=192)
    with model.disable_adapter():  # what evaluate calls on a PeftModel
        base_ce = token_weighted_ce(model, tokenizer, rows, SYSTEM, batch_size=4, max_length=192)
    assert tuned["cross_entropy"] < base_ce["cross_entropy"]
    assert metrics["eval_ce"] == pytest.approx(tuned["cross_entropy"], rel=1e-5)

    save_adapter(model, tokenizer, p, tmp_path / "adapter")
    assert adapter_kind(tmp_path / "adapter") == "loreft"
    fresh_tok = load_tokenizer(str(tmp_path / "adapter"))
    fresh = load_causal_lm(str(tiny_model_dir))
    resize_for_tokenizer(fresh, fresh_tok)
    pristine = {k: v.clone() for k, v in fresh.state_dict().items()}
    loreft.load(fresh, tmp_path / "adapter")
    again = token_weighted_ce(fresh, fresh_tok, rows, SYSTEM, batch_size=4, max_length=192)
    assert again["cross_entropy"] == pytest.approx(tuned["cross_entropy"], rel=1e-5)
    base_state = {k: v for k, v in fresh.state_dict().items() if not k.startswith("loreft.")}
    assert base_state.keys() == pristine.keys()
    assert all(torch.equal(base_state[k], pristine[k]) for k in pristine), "the base must stay frozen"


# ------------------------------------------------------------------------------------------ checkpoint/resume


class Kill(TrainerCallback):
    """Stands in for a SIGKILL right after optimizer step `at` (the checkpoint before it is on disk)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


@pytest.mark.slow
def test_killed_run_resumes_and_ends_with_the_same_adapter(tiny_model_dir, small, tmp_path):
    base = base_of(tiny_model_dir)
    # 24 rows / batch 4 = 6 steps per epoch, 2 epochs = 12 steps; dropout + NEFTune on: RNG state must resume too
    p = cpu_recipe(batch_size=4, epochs=2.0, checkpoint_steps=4, neftune_noise_alpha=5.0)
    straight = train(base, p, small, "cpu", checkpoint_root=tmp_path / "a")
    assert straight[2]["resumed_from_step"] is None and straight[2]["steps"] == 12
    assert not any((tmp_path / "a").iterdir()), "a finished run removes its checkpoints"

    with pytest.raises(KeyboardInterrupt):
        train(base, p, small, "cpu", checkpoint_root=tmp_path / "b", callbacks=(Kill(7),))
    key = checkpoint_key(base, p, data_fingerprint(small))
    assert sorted(d.name for d in (tmp_path / "b" / key).glob("checkpoint-*")) == ["checkpoint-4"]

    # other params (or data) never pick that checkpoint up
    other = cpu_recipe(batch_size=4, epochs=2.0, checkpoint_steps=4, learning_rate=1e-3)
    assert checkpoint_key(base, other, data_fingerprint(small)) != key
    assert checkpoint_key(base, p, data_fingerprint(
        {"train": small["train"].select(range(20)), "eval": small["eval"]})) != key

    resumed = train(base, p, small, "cpu", checkpoint_root=tmp_path / "b")
    assert resumed[2]["resumed_from_step"] == 4 and resumed[2]["steps"] == 12
    a, b = trainable(straight[0]), trainable(resumed[0])
    assert a.keys() == b.keys()
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), f"{n} differs after resume"
    assert resumed[2]["eval_ce"] == pytest.approx(straight[2]["eval_ce"], rel=1e-5)
    assert resumed[2]["tokens_seen"] == straight[2]["tokens_seen"]


@pytest.mark.slow
def test_run_killed_after_an_epoch_boundary_checkpoint_resumes_exactly(tiny_model_dir, small, tmp_path):
    """The last checkpoint is the end of epoch 1 (step 6 of 6 per epoch): the per-epoch evaluation must not sit
    between that checkpoint and epoch 2 (it draws from the global RNG, and a resumed run would skip it)."""
    base = base_of(tiny_model_dir)
    p = cpu_recipe(batch_size=4, epochs=2.0, checkpoint_steps=3, neftune_noise_alpha=5.0)
    straight = train(base, p, small, "cpu", checkpoint_root=tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        train(base, p, small, "cpu", checkpoint_root=tmp_path / "b", callbacks=(Kill(8),))
    key = checkpoint_key(base, p, data_fingerprint(small))
    assert sorted(d.name for d in (tmp_path / "b" / key).glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    resumed = train(base, p, small, "cpu", checkpoint_root=tmp_path / "b")
    assert resumed[2]["resumed_from_step"] == 6 and resumed[2]["steps"] == 12
    a, b = trainable(straight[0]), trainable(resumed[0])
    worst = max(float((a[n] - b[n]).abs().max()) for n in a)
    assert worst <= 1e-6, f"max |dw| {worst:.2e} after resuming from the epoch-boundary checkpoint"
    assert resumed[2]["eval_ce"] == pytest.approx(straight[2]["eval_ce"], rel=1e-6)
    evals = [[(h["epoch"], round(h["eval_loss"], 6)) for h in run[3] if "eval_loss" in h] for run in (straight, resumed)]
    assert evals[0] == evals[1] and [e for e, _ in evals[0]] == [1.0, 2.0], "one eval per epoch, in both runs"


# -------------------------------------------------------------------------------------------------- NEFTune


def test_neftune_noise_scales_with_each_rows_real_length():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 32)
    alpha, pad = 5.0, 0
    emb.register_forward_hook(neftune_per_length(alpha, pad))
    ids = torch.tensor([[3] * 4 + [pad] * 60, [4] * 64])
    clean = torch.nn.functional.embedding(ids, emb.weight).detach()
    noisy = emb(ids).detach()
    noise = noisy - clean
    short, long_ = noise[0, :4].abs().max(), noise[1].abs().max()
    assert short <= alpha / (4 * 32) ** 0.5 + 1e-6 and short > 0.5 * alpha / (4 * 32) ** 0.5
    assert long_ <= alpha / (64 * 32) ** 0.5 + 1e-6
    assert torch.count_nonzero(noise[0, 4:]) == 0, "pad positions get no noise"
    emb.eval()
    assert torch.equal(emb(ids), clean), "no noise at eval time"


# ------------------------------------------------------------------------------------------------- GPU bench


def test_gpu_bench_times_the_stages_own_path_end_to_end_in_smoke_mode(tmp_path, repo):
    """bench/bench_train_gpu.py --smoke: the stage's train() (recipe of params.yaml) on a tiny random base, CPU."""
    import os
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(repo / "bench/bench_train_gpu.py"), "--smoke", "--json", str(out),
                           "--model-dir", str(tmp_path / "base")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["method"] for r in results] == ["lora_plus", "dora"]
    for r in results:
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == 2 and 32 <= r["mean_seq_tokens"] <= 64
        assert r["gradient_checkpointing"] is True and r["neftune_noise_alpha"] and r["group_by_length"]
        assert r["padding_fraction"] > 0  # right padding of rows of different lengths, as the stage trains
        assert r["trainable_params"] > 513 * 64  # LoRA + the embedding copy (512 words + the added pad token)
    assert "stages.train.trainer" in proc.stderr  # the stage's logger: its own code ran
    assert json.loads((tmp_path / "base" / "config.json").read_text())["num_hidden_layers"] == 2


# ------------------------------------------------------------------------------------------- lineage/metrics


def test_lineage_is_complete(tmp_path, monkeypatch, tiny_model_dir):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("train:\n  method: lora_plus\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  validate:\n    outs:\n"
                                       "    - path: artifacts/validate/dataset\n      md5: abc123.dir\n")
    monkeypatch.chdir(tmp_path)
    p = cpu_recipe()
    metrics = {"wall_s": 3.2, "tokens_seen": 1234, "world_size": 1, "steps": 5, "data_sha256": "f" * 64,
               "checkpoint_key": "k", "resumed_from_step": None, "eval_ce": 2.5}
    lin = lineage(base_of(tiny_model_dir), p, metrics)
    assert lin["git_dirty"] is True  # untracked params.yaml
    assert lin["inputs"] == {"artifacts/validate/dataset": "abc123.dir"}
    assert lin["params"]["train"]["method"] == "lora_plus" and lin["params"]["base"]["seed"] == 7
    assert lin["params_file"] == {"method": "lora_plus"}
    assert all(lin["versions"][k] for k in ("torch", "transformers", "peft", "trl", "datasets", "accelerate",
                                            "python"))
    assert lin["hardware"]["device"] in ("cpu", "cuda") and lin["hardware"]["cpus"]
    assert (lin["seed"], lin["wall_s"], lin["tokens_seen"]) == (7, 3.2, 1234)
    json.dumps(lin)


def test_throughput_metrics_are_reported(trained):
    _, _, metrics, _ = trained
    assert metrics["tokens_per_s"] > 0 and metrics["tokens_seen"] > 0
    assert 0 <= metrics["padding_fraction"] < 0.5
    assert metrics["peak_mem_mb"] > 0 and metrics["world_size"] == 1


@pytest.fixture(scope="module")
def trained(tiny_model_dir, small):
    return train(base_of(tiny_model_dir), cpu_recipe(epochs=1.0), small, "cpu")


def test_param_checks_name_the_key():
    with pytest.raises(ValueError, match="train.loreft.positions"):
        cpu_recipe(loreft=LoreftParams(rank=4, layers=(), positions="middle", dropout=0.0)).check()
    with pytest.raises(ValueError, match="train.checkpoint_steps"):
        cpu_recipe(checkpoint_steps=-1).check()


def test_repo_params_and_profile_parse(repo):
    import yaml

    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]
    persisted = [o for o in dvc["outs"] if isinstance(o, dict) and "cache/train" in o]
    # persisted (a killed run resumes) and DVC-cached (queued experiments, temporary copies, see it too)
    assert persisted == [{"cache/train": {"persist": True}}]
    assert Path(repo / "configs/accelerate").is_dir()
