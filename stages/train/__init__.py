"""Train stage: a LoRA+ (or LoRA / DoRA / QLoRA / LoReFT) adapter on the validated QA pairs, the model card's recipe.

    python -m stages.train            # from the repository (or workspace) root
    accelerate launch --config_file configs/accelerate/ddp.yaml -m stages.train     # multi-GPU (rank 0 writes)
    accelerate launch --multi_gpu --num_processes 2 -m stages.train                   # CPU smoke: 2 gloo ranks

Reads  params.yaml (`train:` and base.seed/model/system_prompt/hf_offline/max_length), artifacts/validate/dataset
       (a datasets.DatasetDict with "train" and "eval" splits of question/answer pairs), and with `train.text.share`
       > 0 artifacts/scrape/papers.jsonl (the training papers' text: see `trainer`).
Writes artifacts/train/adapter/ (standard PEFT folder + tokenizer with the added pad token + lineage.json; for
       loreft the native qrb.loreft layout instead of PEFT's), metrics/train.json (eval CE, train loss, tokens/s,
       trainable parameters), reports/train.json (all of it: padding fraction, peak memory, steps, energy, the
       checkpoint key), dvclive/ (DVCLive: metrics.json the last logged values, plots/metrics/<name>.tsv each
       logged value against the optimizer step, params.yaml the SFTConfig; `train.report_to` also sends them to
       wandb, mlflow or tensorboard, configured by their own environment variables), and checkpoints in
       cache/train/<key>/ (key = hash of params + data + base model; persisted by DVC, so a killed run resumes
       where it stopped and a run with other params or data never picks them up; removed after success).

The recipe and why each part is as it is: docs/recipe.md. The parts: `trainer` (the params and all the code that
reads them: tokenizer, adapter, model, optimizer, rows, SFTConfig, the `train()` core), `hooks` (what the stage adds
to trl and transformers), `lineage` (fingerprints, checkpoint key, energy meter, lineage.json), `gate` (the
confidence gate), `run` (the files). This module stays light (no torch import).
"""

from __future__ import annotations

from .trainer import TrainParams

SECTION = "train"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline", "max_length")
PARAMS_CLASS = TrainParams
