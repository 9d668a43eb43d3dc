"""params.yaml, dvc.yaml and the stages' typed params agree; bad params fail fast, naming the key."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.workspace import profile_params
from qrb.params import Base, build, deep_merge, load_params, read_yaml

REPO = Path(__file__).resolve().parent.parent
STAGES = ("scrape", "index", "generate", "validate", "train", "evaluate", "model_card", "export")


def dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(name: str):
    return importlib.import_module(f"stages.{name}")


def test_dvc_yaml_has_the_five_stages_in_order():
    assert list(dvc_stages())[:len(STAGES)] == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_depends_on_the_stages_section_and_the_base_keys_it_reads(stage):
    mod = stage_module(stage)
    expected = {mod.SECTION, *getattr(mod, "OTHER_SECTIONS", ())} | {f"base.{k}" for k in mod.BASE_KEYS}
    listed = set(dvc_stages()[stage].get("params", []))
    assert listed == expected, (f"dvc.yaml lists but stage does not read: {sorted(listed - expected)}; "
                                f"stage reads but dvc.yaml does not list: {sorted(expected - listed)}")


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("profile", [None, "tiny"])
def test_every_listed_key_exists_and_loads(stage, profile, tmp_path):
    params = profile_params(profile, REPO)
    for key in dvc_stages()[stage].get("params", []):
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"{key} listed in dvc.yaml is missing from params"
            node = node[part]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    mod = stage_module(stage)
    base, p = load_params(mod.SECTION, mod.PARAMS_CLASS, mod.BASE_KEYS, tmp_path / "params.yaml")
    assert dataclasses.is_dataclass(p) and set(base) == set(mod.BASE_KEYS)


def test_params_yaml_keeps_the_card_recipe():
    t = read_yaml(REPO / "params.yaml")["train"]
    assert t["method"] == "lora_plus" and t["loraplus_lr_ratio"] == 8
    assert (t["lora"]["r"], t["lora"]["alpha"], t["lora"]["dropout"]) == (8, 16, 0.1)
    assert t["lora"]["init"] == "kaiming" and t["lora"]["modules_to_save"] == ["embed_tokens"]
    assert "lm_head" not in t["lora"]["target_modules"] + t["lora"]["modules_to_save"]
    assert set(t["lora"]["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"}
    assert float(t["learning_rate"]) == 1e-4 and t["lr_scheduler"] == "cosine"
    assert (t["weight_decay"], t["max_grad_norm"], t["batch_size"], t["epochs"]) == (0.01, 0.3, 8, 4)
    assert t["neftune_noise_alpha"] > 0 and t["precision"] == "bf16" and t["padding_side"] == "right"
    assert t["completion_only_loss"] is True and t["pad_token"]
    assert read_yaml(REPO / "params.yaml")["base"]["model"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_misspelled_key_is_named_with_a_suggestion():
    from stages.train import TrainParams

    data = read_yaml(REPO / "params.yaml")["train"]
    data["lora"] = {**data["lora"], "rank": 8}
    with pytest.raises(ValueError, match=r"unknown key `train\.lora\.rank`"):
        build(TrainParams, data, "train")
    data = {**read_yaml(REPO / "params.yaml")["train"], "learnig_rate": 1e-4}
    with pytest.raises(ValueError, match=r"`train\.learnig_rate`.*did you mean `train\.learning_rate`"):
        build(TrainParams, data, "train")


def test_wrong_type_and_missing_key_are_named():
    from stages.train import TrainParams

    data = read_yaml(REPO / "params.yaml")["train"]
    with pytest.raises(ValueError, match=r"`train\.batch_size` must be an integer, got 'eight'"):
        build(TrainParams, {**data, "batch_size": "eight"}, "train")
    with pytest.raises(ValueError, match=r"`train\.method` must be one of"):
        build(TrainParams, {**data, "method": "full"}, "train")
    missing = dict(data)
    missing.pop("epochs")
    with pytest.raises(ValueError, match=r"missing key `train\.epochs`"):
        build(TrainParams, missing, "train")
    with pytest.raises(ValueError, match=r"`base\.seed` must be an integer"):
        build(Base, {**read_yaml(REPO / "params.yaml")["base"], "seed": 1.5}, "base")


def test_yaml_scientific_notation_string_is_a_float():
    from stages.train import TrainParams

    data = {**read_yaml(REPO / "params.yaml")["train"], "learning_rate": "1e-4"}
    assert build(TrainParams, data, "train").learning_rate == 1e-4


def test_profile_typo_is_rejected():
    with pytest.raises(ValueError, match=r"unknown key `train\.lora\.rr`"):
        deep_merge(read_yaml(REPO / "params.yaml"), {"train": {"lora": {"rr": 4}}})


def test_stage_with_misspelled_key_fails_fast_with_one_line(tmp_path):
    params = read_yaml(REPO / "params.yaml")
    params["train"]["lora"]["alhpa"] = params["train"]["lora"].pop("alpha")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "`train.lora.alhpa`" in proc.stderr.strip().splitlines()[-1]
    assert "did you mean `train.lora.alpha`" in proc.stderr


def test_flagship_train_without_gpu_is_one_clear_line(tmp_path):
    """The real recipe (bf16 8B) on a machine with no CUDA: one line, before any download is tried."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "needs a CUDA GPU" in last and "meta-llama/Llama-3.1-8B-Instruct" in last
