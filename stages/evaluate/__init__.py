"""Evaluate stage: the model card's metrics table, for every experiment, with error bars and rivals.

    python -m stages.evaluate         # from the repository (or workspace) root

Reads  params.yaml (`evaluate:` and base.seed/model/system_prompt/hf_offline), artifacts/train/adapter/,
       artifacts/validate/eval.jsonl (held-out generated pairs), the golden questions (`evaluate.golden`, in data/),
       artifacts/scrape/papers.jsonl (the retrieval baseline's passages and paper dates), and the API keys of the
       rival endpoints from the environment variables that `evaluate.rivals[].api_key_env` names.
Writes metrics/evaluate.json ({question set: {model: {metric: value, metric_ci95: [lo, hi]}}}),
       artifacts/evaluate/predictions.jsonl (per question and model: prediction and its scores),
       reports/eval_table.md (shaped like the card's table), plots/evaluate/scores.csv (the DVC plot).

Models, all answering the same questions with the same system prompt (greedy by default, `max_new_tokens`):
  fine_tuned  the base model + the trained adapter (batched generation, left padding)
  base        the same model with the adapter disabled
  rag         the base model given the top-k abstracts of the scraped papers closest to the question by MiniLM
              embedding similarity (`rag_top_k`; 0 leaves the row out)
  rival_<n>   each OpenAI-compatible endpoint of `evaluate.rivals` (skipped, with the reason, when its key is
              missing or it keeps failing; the others are still scored)
Question sets: `golden` and `eval`, each also split by freshness into `<set>_after_cutoff` / `<set>_before_cutoff`:
questions on papers published after `knowledge_cutoff` (the base model's) vs on or before it. A question's date is
its `published` field, else its paper's (papers.jsonl, by DOI or arXiv id), else the DOI's date (10.22331/q-YYYY-
MM-DD-N), else the arXiv id's month; undated questions are in neither split.

Metrics come from their reference libraries: rouge-score (F, stemming on), sacrebleu (corpus BLEU), bert-score
(P/R/F1); token-weighted cross-entropy of the reference answers for local models; mean answer length in words.
Every metric has a 95% percentile bootstrap interval (`bootstrap_samples` resamples of the questions, the same
resamples for every model: corpus BLEU and CE are recomputed from summed per-question statistics per resample).

This module stays light (no torch, no metric libraries): `questions` loads the sets and dates them, `metrics` scores
and bootstraps, `core.evaluate` answers every set with every model, `report` renders and writes the outputs, `run`
does the I/O around them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from qrb.rivals import Rival


@dataclass(frozen=True)
class EvaluateParams:
    golden: str
    bertscore_model: str
    bertscore_num_layers: int
    max_new_tokens: int
    batch_size: int
    greedy: bool
    bootstrap_samples: int       # resamples for the 95% intervals
    knowledge_cutoff: dt.date    # the base model's (Llama-3.1: December 2023): the freshness split
    rag_top_k: int               # abstracts given to the retrieval baseline; 0 = no RAG row
    rag_max_chars: int           # each abstract cut to this many characters in the prompt
    rivals: tuple[Rival, ...]    # OpenAI-compatible endpoints answering the same questions
    rival_timeout_s: float
    rival_max_retries: int       # the openai SDK's retries (429/5xx/timeouts, honouring Retry-After)
    rival_concurrency: int

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bertscore_num_layers < 1:
            raise ValueError("params: `evaluate.max_new_tokens`, `evaluate.batch_size` and "
                             "`evaluate.bertscore_num_layers` must be positive integers")
        if self.bootstrap_samples < 100:
            raise ValueError("params: `evaluate.bootstrap_samples` must be at least 100 for a 95% interval")
        if self.rag_top_k < 0 or self.rag_max_chars < 50:
            raise ValueError("params: `evaluate.rag_top_k` must be >= 0 and `evaluate.rag_max_chars` >= 50")
        if self.rival_timeout_s <= 0 or self.rival_max_retries < 0 or self.rival_concurrency < 1:
            raise ValueError("params: `evaluate.rival_timeout_s` must be > 0, `evaluate.rival_max_retries` >= 0 "
                             "and `evaluate.rival_concurrency` >= 1")
        keys = [r.key for r in self.rivals]
        if len(set(keys)) != len(keys):
            raise ValueError("params: `evaluate.rivals` names must be distinct (after non [A-Za-z0-9_-] -> _)")
        for r in self.rivals:
            if not r.base_url.startswith(("http://", "https://")):
                raise ValueError(f"params: `evaluate.rivals` {r.name!r}: base_url must be an http(s) URL")


# What `qrb.stage.run_stage` wires (tests/test_params.py checks them against dvc.yaml): the params section, the
# `base:` keys the stage reads, and their typed class.
SECTION = "evaluate"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline", "max_length")
PARAMS_CLASS = EvaluateParams
