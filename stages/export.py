"""Export stage: the adapter with its card, the adapter merged into the base, and a GGUF of the merge for llama.cpp,
Ollama and LM Studio.

    python -m stages.export           # from the repository (or workspace) root, after model_card

Reads  params.yaml (`export:` and base.model/system_prompt/hf_offline/max_length), artifacts/train/adapter/,
       artifacts/model_card/ (README.md, loss.png), artifacts/validate/eval.jsonl (for the metric check).
Writes artifacts/export/adapter/ (the PEFT adapter + tokenizer + the model card: what goes to the Hub),
       artifacts/export/merged/ (the adapter merged into the base loaded in `export.merge_precision`: bf16, fp16 or
       fp32, never a 4-bit base; a plain transformers model folder, what `vllm serve` takes; for a base that ties
       embed_tokens and lm_head, an untied model: the trained embedding and the frozen lm_head),
       artifacts/export/gguf/ (`<base>-qrb-<type>.gguf`, the merge as Q8_0 or F16 per `export.gguf`, and an Ollama
       `Modelfile`: `ollama create quantum-research-bot -f artifacts/export/gguf/Modelfile`; see docs/serving.md),
       reports/export.json and metrics/export.json (sizes on disk and the token-weighted eval cross-entropy of the
       adapter, the merge and the GGUF as transformers' GGUF loader reads it back: the merge must not move it, the
       GGUF's change is reported).

With `export.hub_repo_id` set, the adapter folder is pushed to the Hugging Face Hub at the end with the token in the
variable named by `export.hub_token_env`, and the training pairs (artifacts/validate/openai/: OpenAI chat JSON Lines)
to the dataset repo of the same id; a missing token fails the stage before any work (never with base.hf_offline:
then nothing is pushed).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qrb.errors import ConfigError, QrbError
from qrb.gguf_export import adds_special, load_gguf, modelfile, write_gguf
from qrb.io import read_jsonl, write_metrics
from qrb.model import GATE_FILE, adapter_kind
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "export"
BASE_KEYS = ("model", "system_prompt", "hf_offline", "max_length")

ADAPTER_DIR = Path("artifacts/train/adapter")
CARD_DIR = Path("artifacts/model_card")
EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")
DATASET = Path("artifacts/validate/openai")  # train.jsonl, eval.jsonl: pushed beside the adapter
OUT = Path("artifacts/export")
ADAPTER_OUT = OUT / "adapter"
METRICS = Path("metrics/export.json")  # the headline numbers (dvc metrics); the whole record in REPORT
REPORT = Path("reports/export.json")
HEADLINE = ("eval_ce.*", "gguf_ce_delta", "gguf_size_ratio")


@dataclass(frozen=True)
class ExportParams:
    merge_precision: Literal["bf16", "fp16", "fp32"]  # no 4-bit option: merging into nf4 loses the adapter
    gguf: Literal["q8_0", "f16", "none"]  # the GGUF's weights: Q8_0 (8.5 bits a weight), F16, or no GGUF
    eval_batch_size: int
    hub_repo_id: str | None
    hub_token_env: str
    hub_private: bool

    def check(self) -> None:
        if self.eval_batch_size < 1:
            raise ValueError("params: `export.eval_batch_size` must be a positive integer")
        if self.hub_repo_id is not None and self.hub_repo_id.count("/") != 1:
            raise ValueError("params: `export.hub_repo_id` must be `owner/name` or null")


PARAMS_CLASS = ExportParams


# ---- merge --------------------------------------------------------------------------------------------------------

def load_base_and_adapter(base: dict[str, Any], p: ExportParams, adapter_dir: Path, device: str):
    from qrb.model import load_with_adapter, torch_dtype

    if adapter_kind(adapter_dir) == "loreft":
        raise ConfigError(LOREFT_NOT_MERGEABLE)
    model, tokenizer = load_with_adapter(base["model"], adapter_dir, dtype=torch_dtype(p.merge_precision))
    if getattr(model.config, "quantization_config", None) or getattr(model, "is_loaded_in_4bit", False):
        raise ConfigError(f"{base['model']} loads quantized; the adapter is merged into a full-precision "
                         "base only (a 4-bit merge loses the adapter's small deltas)")
    model = model.to(device)
    model.eval()
    return model, tokenizer


LOREFT_NOT_MERGEABLE = ("a LoReFT adapter is an intervention on hidden states, not a weight delta: it cannot be "
                        "merged into the base (serve it with `qrb serve`)")


def weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def export(base: dict[str, Any], p: ExportParams, rows: list[dict[str, str]], device: str,
           adapter_dir: Path = ADAPTER_DIR, card_dir: Path = CARD_DIR, out: Path = OUT) -> dict[str, Any]:
    """Core: write out/{adapter,merged,gguf} and return the metrics (sizes, eval CE of each form and the deltas)."""
    import torch

    from qrb.model import token_weighted_ce

    def ce(model, tok, what: str) -> dict[str, float]:
        return token_weighted_ce(model, tok, rows, base["system_prompt"], batch_size=p.eval_batch_size,
                                 max_length=base["max_length"], desc=f"eval CE ({what})")

    adapter_out, merged_out, gguf_out = out / "adapter", out / "merged", out / "gguf"
    for d in (adapter_out, merged_out, gguf_out):
        if d.exists():
            shutil.rmtree(d)
    shutil.copytree(adapter_dir, adapter_out)
    for name in ("README.md", "loss.png"):
        if (card_dir / name).exists():
            shutil.copy2(card_dir / name, adapter_out / name)

    if adapter_kind(adapter_dir) == "loreft":  # a method comparison must not fail here: say why, export the rest
        for d in (merged_out, gguf_out):
            d.mkdir(parents=True)
            (d / "NOT_EXPORTED.md").write_text(f"Not exported: {LOREFT_NOT_MERGEABLE}.\n")
        log.warning("export: %s; only the adapter folder is exported", LOREFT_NOT_MERGEABLE)
        return {"merge_precision": p.merge_precision, "eval_rows": len(rows), "skipped": LOREFT_NOT_MERGEABLE,
                "size_bytes": {"adapter": weight_bytes(adapter_dir)}}
    peft_model, tokenizer = load_base_and_adapter(base, p, adapter_dir, device)
    ce_adapter = ce(peft_model, tokenizer, "adapter") if rows else None
    model = peft_model.merge_and_unload()  # the adapter folded into the base weights, the embedding copy in place
    del peft_model
    model.config.pad_token_id = tokenizer.pad_token_id
    # On a tied base the trained copy replaced one side of the tie (lm_head kept the frozen original): the merge is
    # an untied model. peft marks it so; a config still saying tied would make every reload drop the saved lm_head
    # and tie it to the trained embedding.
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        model.config.tie_word_embeddings = False
    model.save_pretrained(merged_out)
    tokenizer.save_pretrained(merged_out)
    if (adapter_dir / GATE_FILE).exists():  # `qrb serve --model` on the merged model declines as the adapter does
        shutil.copy2(adapter_dir / GATE_FILE, merged_out / GATE_FILE)
    ce_merged = ce(model, tokenizer, "merged") if rows else None
    stop_ids = model.generation_config.eos_token_id if model.generation_config else None
    del model
    metrics: dict[str, Any] = {
        "merge_precision": p.merge_precision, "eval_rows": len(rows),
        "eval_tokens": ce_merged["tokens"] if ce_merged else 0,
        "size_bytes": {"adapter": weight_bytes(adapter_dir), "merged": weight_bytes(merged_out)},
        "eval_ce": {"adapter": ce_adapter and ce_adapter["cross_entropy"],
                    "merged": ce_merged and ce_merged["cross_entropy"]},
    }
    if ce_merged:
        metrics["merge_ce_delta"] = ce_merged["cross_entropy"] - ce_adapter["cross_entropy"]
    gguf_out.mkdir(parents=True)  # a declared out: present (and empty with `export.gguf: none`)
    if p.gguf != "none":  # the merge as <base>-qrb-<type>.gguf and the Ollama Modelfile beside it
        stops = [tokenizer.eos_token_id] + (stop_ids if isinstance(stop_ids, list) else [stop_ids] if stop_ids else [])
        name = f"{Path(base['model']).name}-qrb-{p.gguf}.gguf"
        metrics.update(gguf_file=name, gguf_tensor_types=write_gguf(merged_out, gguf_out / name, p.gguf))
        (gguf_out / "Modelfile").write_text(modelfile(name, tokenizer, adds_special(tokenizer)[0],
                                                      base["system_prompt"], base["max_length"], stops))
        metrics["size_bytes"]["gguf"] = (gguf_out / name).stat().st_size
        metrics["gguf_size_ratio"] = metrics["size_bytes"]["gguf"] / metrics["size_bytes"]["merged"]
        if ce_merged:  # read back by an independent reader, with the GGUF's own tokenizer and chat template
            reread, reread_tok = load_gguf(gguf_out / name, merged_out)
            metrics["eval_ce"]["gguf"] = ce(reread.to(device), reread_tok, f"gguf {p.gguf}")["cross_entropy"]
            metrics["gguf_ce_delta"] = metrics["eval_ce"]["gguf"] - ce_merged["cross_entropy"]
            del reread
    if device == "cuda":
        torch.cuda.empty_cache()
    return metrics


def hub_token(base: dict[str, Any], p: ExportParams) -> str | None:
    """The Hub token when the adapter is to be pushed: checked before any work, so a missing one costs nothing."""
    if not p.hub_repo_id:
        return None
    if base["hf_offline"]:
        log.warning("export: base.hf_offline is set: not pushing to %s", p.hub_repo_id)
        return None
    if not os.environ.get(p.hub_token_env):
        raise ConfigError(f"export.hub_repo_id is {p.hub_repo_id} but ${p.hub_token_env} is not set: export a Hub "
                          "write token in it, or set export.hub_repo_id: null")
    return os.environ[p.hub_token_env]


def push_to_hub(p: ExportParams, token: str, folder: Path, dataset: Path = DATASET) -> str:
    """Push the adapter folder, and the dataset folder as the dataset repo of the same id; returns the repo id."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(p.hub_repo_id, private=p.hub_private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=p.hub_repo_id,
                          commit_message="quantum-research-bot: adapter and model card")
        api.create_repo(p.hub_repo_id, repo_type="dataset", private=p.hub_private, exist_ok=True)
        api.upload_folder(folder_path=str(dataset), repo_id=p.hub_repo_id, repo_type="dataset",
                          commit_message="quantum-research-bot: the training pairs as OpenAI chat JSON Lines")
    except Exception as e:  # network, auth, permissions: one line, the local export is already written
        raise QrbError(f"pushing to the Hub ({p.hub_repo_id}) failed: "
                       f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    return p.hub_repo_id


def run(base: dict[str, Any], p: ExportParams, args) -> None:
    import torch

    token = hub_token(base, p)
    if not (CARD_DIR / "README.md").exists():
        raise ConfigError(f"no model card in {CARD_DIR}: run the model_card stage first")
    if not EVAL_PAIRS.exists():
        raise ConfigError(f"{EVAL_PAIRS} not found: run the validate stage first")
    rows = list(read_jsonl(EVAL_PAIRS))
    if p.merge_precision in ("bf16", "fp16") and not torch.cuda.is_available():
        log.info("export: merging in %s on the CPU (slower, same result)", p.merge_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = export(base, p, rows, device)
    metrics["pushed_to"] = push_to_hub(p, token, ADAPTER_OUT) if token else None
    write_metrics(METRICS, REPORT, metrics, HEADLINE)
    if "skipped" not in metrics:
        ce = metrics["eval_ce"]
        log.info("export: merged %.1f MB, GGUF %s; eval CE merged %s, GGUF %s",
                 metrics["size_bytes"]["merged"] / 1e6, metrics.get("gguf_file", "not written"),
                 ce["merged"] and f"{ce['merged']:.4f}", ce.get("gguf") and f"{ce['gguf']:.4f}")


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
