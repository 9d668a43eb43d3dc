"""Evaluate stage: every answer of every model graded against the question's short gold answer, and the model card's
metrics table, for every experiment, with error bars and rivals.

    python -m stages.evaluate         # from the repository (or workspace) root

Reads  params.yaml (`evaluate:` and base.seed/model/system_prompt/hf_offline/max_length), artifacts/train/adapter/,
       the question sets: the golden questions (`evaluate.golden`, in data/), artifacts/validate/seen.jsonl (seen
       papers, new questions), artifacts/validate/eval.jsonl (held-out papers) and artifacts/validate/invented.jsonl
       (papers that do not exist; a workspace from before it existed reads it as empty, with a note), each row with
       its `short_answer` and `aliases`; artifacts/scrape/papers.jsonl (the papers' dates); with `evaluate.rag`,
       artifacts/index (the `index` stage's) and params.yaml `retrieval:` (how the apps search it); the
       API keys of the rival endpoints and of the LLM grader from the environment variables that
       `evaluate.rivals[].api_key_env` / `grader.api_key_env` name; prompts/grade.txt and cache/evaluate/grader.sqlite
       (the LLM grader's prompt and cached grades; only with `evaluate.grader`).
Writes reports/evaluate.json ({question set or subset: {model: {metric: value, metric_ci95: [lo, hi] or "n too
       small"}}}), metrics/evaluate.json (its headline: per question set and model, correct, not_attempted,
       hallucination_rate, cross_entropy, and for the RAG rows recall_at_k and citation_accuracy; what
       `dvc metrics diff` and `dvc exp show` compare),
       artifacts/evaluate/predictions.jsonl (per question and model: prediction, grade, scores), reports/eval_table.md
       (shaped like the card's table), plots/evaluate/scores/<set>.csv (a DVC plot each), cache/evaluate/grader.sqlite.

Models, all answering the same questions with the same system prompt (greedy by default, `max_new_tokens`):
  base            the base model (the adapter disabled)
  fine_tuned      the base model + the trained adapter (batched generation, left padding)
  rag             the base model answering as `qrb ask --rag` does (`evaluate.rag`; false leaves both RAG rows out):
                  the passages qrb.retrieval.ground finds in artifacts/index by the `retrieval:` params, in the same
                  user message; where no passage reaches `retrieval.min_score`, the apps' abstention (no model call)
  fine_tuned_rag  the adapter given the same passages: does fine-tuning add to retrieval?
  rival_<n>       each OpenAI-compatible endpoint of `evaluate.rivals` (skipped, with the reason, when its key is
                  missing or it keeps failing; the others are still scored)
Question sets: `golden` (the card's questions), `seen` (facts that training taught, asked in words training never
used: the answer should be correct), `eval` (papers training never saw: a closed-book model should not attempt them;
only retrieval can know) and `invented` (papers that do not exist: the right answer is not to attempt), each also
split by freshness into `<set>_after_cutoff` / `<set>_before_cutoff`: questions on papers that first became public
after `knowledge_cutoff` (the base model's) vs on or before it. A paper first became public at the earliest of its
arXiv v1 month (the arXiv id's YYMM, the row's or its paper's in papers.jsonl) and its journal date (the row's
`published`, its paper's, else the DOI's q-YYYY-MM-DD); undated questions are in neither split.

Grades (the headline, SimpleQA's): each answer is correct, incorrect or not_attempted against the row's short answer
and aliases, by the offline matcher (qrb/grade.py), or by the LLM grader where `evaluate.grader` is set
(stages/evaluate/judge.py; the offline grade is kept beside it in the predictions). A row without a short answer is
graded attempted or not: on an invented paper (kind `abstain`) an attempt is incorrect; on a fact row whose gold is
missing it counts as "no gold" (out of correct/incorrect). Per set and model: `correct`, `incorrect`,
`not_attempted` (shares of the graded questions), `hallucination_rate` = incorrect / (correct + incorrect), and for
every model but base `correct_gain` / `not_attempted_gain`, the paired difference against base on the same questions.
The RAG rows cite what the apps cite (the papers of the excerpts the answer names as [n], qrb.retrieval.cite; graded
without those markers): `recall_at_k`, the share of questions whose own paper (DOI) is among the passages shown, and
`citation_accuracy`, the share of attempted answers whose first cited paper is the question's (an answer citing
nothing is wrong); neither is defined without a DOI (invented papers).
Beside them, from their reference libraries: rouge-score (F, stemming on), sacrebleu (corpus BLEU `bleu`, and the
mean of sentence BLEUs `sentence_bleu`, the card's "mean/avg"), bert-score (P/R/F1); token-weighted cross-entropy
of the reference answers for the local models without retrieval; mean answer length in words.
Every metric has a 95% percentile bootstrap interval (`bootstrap_samples` resamples of the questions, the same
resamples for every model: corpus BLEU and CE are recomputed from summed per-question statistics per resample), or
"n too small" below `min_n_for_interval` questions.

This module stays light (no torch, no metric libraries): `judge` asks the LLM grader (the offline grader is
`qrb.grade`), `metrics` scores and bootstraps, `core.evaluate` answers every set with every model and dates the
questions for the freshness split, `report` renders and writes the outputs, `run` does the I/O around them (the
question sets read).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from qrb.rivals import Rival


@dataclass(frozen=True)
class Grader:
    base_url: str      # any OpenAI-compatible endpoint
    model: str
    api_key_env: str   # the NAME of the environment variable holding the key; the key never enters params


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
    rag: bool                    # the rag and fine_tuned_rag rows (the apps' retrieval, `retrieval:` params)
    rivals: tuple[Rival, ...]    # OpenAI-compatible endpoints answering the same questions
    rival_timeout_s: float
    rival_max_retries: int       # the openai SDK's retries (429/5xx/timeouts, honouring Retry-After)
    rival_concurrency: int
    grader: Grader | None        # an LLM that grades instead of the offline matcher (rivals' timeout/retries/concurrency)
    min_n_for_interval: int      # fewer questions than this: "n too small" instead of an interval

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bertscore_num_layers < 1:
            raise ValueError("params: `evaluate.max_new_tokens`, `evaluate.batch_size` and "
                             "`evaluate.bertscore_num_layers` must be positive integers")
        if self.bootstrap_samples < 100:
            raise ValueError("params: `evaluate.bootstrap_samples` must be at least 100 for a 95% interval")
        if self.rival_timeout_s <= 0 or self.rival_max_retries < 0 or self.rival_concurrency < 1:
            raise ValueError("params: `evaluate.rival_timeout_s` must be > 0, `evaluate.rival_max_retries` >= 0 "
                             "and `evaluate.rival_concurrency` >= 1")
        if self.min_n_for_interval < 2:
            raise ValueError("params: `evaluate.min_n_for_interval` must be >= 2 (one question has no spread)")
        if self.grader is not None and not self.grader.base_url.startswith(("http://", "https://")):
            raise ValueError("params: `evaluate.grader.base_url` must be an http(s) URL")
        keys = [r.key for r in self.rivals]
        if len(set(keys)) != len(keys):
            raise ValueError("params: `evaluate.rivals` names must be distinct (after non [A-Za-z0-9_-] -> _)")
        for r in self.rivals:
            if not r.base_url.startswith(("http://", "https://")):
                raise ValueError(f"params: `evaluate.rivals` {r.name!r}: base_url must be an http(s) URL")


# What `qrb.stage.run_stage` wires (tests/test_params.py checks them against dvc.yaml): the params section, the
# `base:` keys the stage reads, and their typed class; OTHER_SECTIONS are read whole beside it (qrb.retrieval's).
SECTION = "evaluate"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline", "max_length")
PARAMS_CLASS = EvaluateParams
OTHER_SECTIONS = ("retrieval",)
