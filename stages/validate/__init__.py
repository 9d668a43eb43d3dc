"""Validate stage: a great-expectations gate that stops bad question/answer pairs before training.

Run from the repository (or workspace) root:  `python -m stages.validate`  (DVC: `dvc repro validate`).

Reads
  params.yaml `validate:`            thresholds (see `ValidateParams`)
  artifacts/scrape/papers.jsonl      the papers (title + abstract are what answers must be grounded in)
  artifacts/generate/train.jsonl     pairs: question, answer, doi, title, published, prompt_id, model,
  artifacts/generate/eval.jsonl      response_id, chunk, fact_id, variant (split by paper; a fact's K variants
                                     are K wordings of one fact, in the same split)
  artifacts/generate/seen.jsonl      "seen papers, new questions": reworded questions about training facts, never
                                     trained on (the pair fields + source_question; may be empty)
  prompts/judge.txt                  the LLM judge's prompt (only when `judge.endpoint` is set; its API key from the
                                     environment variable `judge.endpoint.api_key_env` names, never written)
  cache/validate/judge.sqlite        the judge's verdicts so far (a persistent DVC out: a rerun pays for none again)

Checks (great-expectations 1.x, ephemeral context, analytics off; one suite per level, each run through a
validation definition and a checkpoint whose action builds Data Docs)
  rows     required fields and types; non-empty; length bounds; a question is a question; unique questions (exact
           and normalised, the first one is kept; variants of one fact may share a question, so rows of one
           fact_id are duplicates only when question and answer both repeat; the seen split on its own); no
           refusals/boilerplate; no leaked prompt, JSON or markup; English;
           DOI format; provenance present; the paper is known and the title matches it; the answer is grounded in the
           paper (token overlap, and MiniLM similarity when `min_similarity` > 0); the question names what it asks
           about instead of leaning on "this paper"/"the text"; the answer does not just repeat the question.
  judge    (optional, `judge.endpoint`; rows of every split that passed the row checks: each verdict is a paid
           request) an LLM behind any OpenAI-compatible endpoint rates the question answerable from its paper and
           the answer correct by it, 1-5 each (stages/validate/judge.py); below `judge.threshold` on either:
           judge_unanswerable / judge_incorrect; no readable verdict: judge_failed. A failing pair counts in the
           gate's failure rate; a failing training pair leaves its seen question without a trained fact.
  seen     (seen rows, after the row checks) the fact has a clean training pair of the same paper; the question
           is no exact or near duplicate of a clean training question (any fact, any variant).
  dataset  (train + eval only) failure rate <= max_fail_rate; clean train facts >= min_rows; clean eval rows >=
           min_eval_rows; eval facts <= max_eval_fraction of the clean facts; no paper above max_paper_share of
           the clean train facts; no paper in both splits. A fact counts once however many variants it has (rows
           without a fact_id count one each), so the gate means the same with and without augmentation.

Writes
  artifacts/validate/quarantine.jsonl  one line per failing row: {split, line, row_id, reasons, scores, row}, and
                                       `judge: {answerable, correct, reason}` (the judge's own words) if judged
  cache/validate/judge.sqlite          one row per verdict, committed as it arrives (a `kill -9` loses none)
  artifacts/validate/dataset           passing rows as a `datasets.DatasetDict` (splits "train", "eval";
  artifacts/validate/train.jsonl       the input pairs' columns), and the same rows as JSON Lines, in input order
  artifacts/validate/eval.jsonl
  artifacts/validate/seen.jsonl        the seen rows that passed (not in the dataset: evaluate scores them)
  artifacts/validate/openai/           train.jsonl, eval.jsonl: the dataset as OpenAI chat fine-tuning JSON Lines
                                       ({"messages": [system (base.system_prompt), user, assistant]}) for other
                                       trainers (trl, LLaMA-Factory, axolotl, OpenAI's fine-tuning API)
  reports/data_docs/                   Data Docs: open index.html (summary of what failed, links to GX's pages)
  reports/validate.json                rows in/out, failures per expectation, dataset checks; `seen`: the same
                                       counts for the seen split; `judge`: rows judged, verdicts per reason,
                                       requests sent and cached, tokens, cost this run and of all verdicts used
  metrics/validate.json                its headline numbers (rows out, quarantined, fail rate; DVC metrics)

Gate: when a dataset-level expectation fails (the failure rate above `max_fail_rate` is one of them) the stage
prints a short summary (counts per reason, a few examples) to stderr and exits 65 (a data error) without writing
the clean dataset (nor seen.jsonl), so `dvc repro` stops before train. Quarantine (every split's failing rows),
metrics and Data Docs are written either way. A failing seen row never closes the gate: the seen set is scored,
not trained on.
"""

# The parts (this module stays light: no great-expectations, datasets or torch import, so `--help` and the params
# test import it cheaply): features (the text checks and computed columns), suite (the expectations and the GX
# runner), judge (the LLM judge), core (`validate()`, the summary, the Data Docs page), run (the files).

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

SECTION = "validate"
BASE_KEYS = ("system_prompt",)  # the OpenAI-format files carry it

# the outputs the summary and the Data Docs page point to (the other paths: stages.validate.run)
QUARANTINE_OUT = Path("artifacts/validate/quarantine.jsonl")
DOCS_OUT = Path("reports/data_docs")
REPORT_OUT = Path("reports/validate.json")  # the whole record

@dataclasses.dataclass(frozen=True)
class JudgeEndpoint:
    """An OpenAI-compatible chat-completions endpoint for the LLM judge."""

    base_url: str      # e.g. https://api.openai.com/v1, a vLLM/Ollama server, the smoke endpoint
    model: str
    api_key_env: str   # the NAME of the environment variable holding the key; the key never enters params


@dataclasses.dataclass(frozen=True)
class JudgeParams:
    """`validate.judge`: the optional LLM judge (`endpoint: null` = off)."""

    endpoint: JudgeEndpoint | None = None
    threshold: int = 3              # 1-5 scores: a pair below this for answerable or correct is quarantined
    max_tokens: int = 300           # per verdict (the reason comes first, then the scores)
    concurrency: int = 4            # requests in flight
    timeout_s: float = 60.0         # per request
    max_retries: int = 3            # the openai SDK's (429 honouring Retry-After, 5xx, time-outs); also per reply
                                    # that holds no readable verdict
    price_input_per_1m: float = 0.0  # USD per 1M tokens
    price_output_per_1m: float = 0.0
    max_cost_usd: float = 1.0       # refuse to start above this estimate; never send a request that could pass it

    def check(self) -> None:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"params: `validate.judge.{key}` must be {rule}, got {getattr(self, key)!r}")

        e = self.endpoint
        if e is not None:
            if not re.match(r"https?://", e.base_url):
                raise ValueError(f"params: `validate.judge.endpoint.base_url` must be an http(s) URL, got "
                                 f"{e.base_url!r}")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e.api_key_env):
                raise ValueError("params: `validate.judge.endpoint.api_key_env` must be the NAME of an environment "
                                 "variable (e.g. OPENAI_API_KEY), not the key itself")
        if not 1 <= self.threshold <= 5:
            raise bad("threshold", "between 1 and 5 (the judge scores 1-5)")
        for key in ("max_tokens", "concurrency"):
            if getattr(self, key) < 1:
                raise bad(key, ">= 1")
        if self.timeout_s <= 0:
            raise bad("timeout_s", "> 0")
        for key in ("max_retries", "price_input_per_1m", "price_output_per_1m", "max_cost_usd"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")


@dataclasses.dataclass(frozen=True)
class ValidateParams:
    """The `validate:` section of params.yaml."""

    min_question_chars: int
    max_question_chars: int
    min_answer_chars: int
    max_answer_chars: int
    min_rows: int               # clean train facts at least this many (>= 1: a fact's variants count once)
    max_fail_rate: float        # share of input train + eval rows that may fail row checks
    max_paper_share: float      # no paper above this share of the clean train facts
    min_grounding: float        # share of the answer's content words found in its paper (title, abstract, metadata)
    min_similarity: float       # MiniLM cosine answer vs best paper sentence; 0 turns the check (and the model) off
    min_eval_rows: int          # clean eval rows at least this many (eval holds variant 0 only: rows = facts)
    max_eval_fraction: float    # clean eval facts at most this share of all clean facts
    judge: JudgeParams = JudgeParams()  # the optional LLM judge (off unless `judge.endpoint` is set)

    def check(self) -> None:
        def bad(key: str, rule: str) -> ValueError:
            return ValueError(f"params: `validate.{key}` must be {rule}, got {getattr(self, key)!r}")

        for key in ("min_question_chars", "min_answer_chars"):
            if getattr(self, key) < 1:
                raise bad(key, ">= 1")
        if self.max_question_chars < self.min_question_chars:
            raise bad("max_question_chars", f">= validate.min_question_chars ({self.min_question_chars})")
        if self.max_answer_chars < self.min_answer_chars:
            raise bad("max_answer_chars", f">= validate.min_answer_chars ({self.min_answer_chars})")
        # An empty training set is never a result: with 0 allowed, no pairs at all "passed" and train failed later
        if self.min_rows < 1:
            raise bad("min_rows", ">= 1")
        if self.min_eval_rows < 0:  # 0 is allowed: a run may hold no eval pairs (evaluate then has the others)
            raise bad("min_eval_rows", ">= 0")
        for key in ("max_fail_rate", "min_grounding"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "between 0 and 1")
        for key in ("max_paper_share", "max_eval_fraction"):
            if not 0.0 < getattr(self, key) <= 1.0:
                raise bad(key, "in (0, 1]")
        if not 0.0 <= self.min_similarity < 1.0:
            raise bad("min_similarity", "in [0, 1) (0 turns the similarity check off)")


PARAMS_CLASS = ValidateParams
