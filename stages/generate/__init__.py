"""Generate stage: question/answer pairs from papers through any OpenAI-compatible chat-completions endpoint.

Run from the repository (or workspace) root:

    python -m stages.generate            # needs the API key in the variable named by `generate.api_key_env`
    python -m stages.generate --dry-run  # prints the request count and cost estimate, calls nothing, writes nothing

Reads `params.yaml` (`generate:`, `base.seed`, `retrieval.top_k` and `retrieval.max_chars`), `artifacts/scrape/papers.jsonl` and the prompt templates
`prompts/system.txt` (the system message of every request) + `prompts/<id>.txt` for each id in `generate.prompts`
(`{{n}}` = pairs per prompt, `{{paper}}` = the paper, delimited as untrusted data between `<paper>` and `</paper>`),
`prompts/augment.txt` (when `generate.augment_variants` > 1) and `prompts/paraphrase.txt` (when
`generate.seen_questions` > 0), whose `{{pair}}` is one pair, delimited the same way.

The run, in three rounds of requests through one client: (1) the QA templates write pairs; each kept pair is a *fact*
(exact and near-duplicate questions across facts removed), split by paper into train and eval; (2) knowledge
augmentation: one `augment` request per training fact asks for `augment_variants - 1` rewordings of it (question
and answer reworded, numbers, names and terms kept); (3) "seen papers, new questions": for up to `seen_questions`
training facts (a seeded sample, one fact per train paper in turn), one `paraphrase` request writes a new question
for the fact's answer, kept only if its word-set Jaccard with every training question is < `seen_max_jaccard`.

RAFT rows (`raft`, no request): `raft_gold_share` of the training facts are also asked as the apps ask with
retrieval (the user message `qrb.retrieval.rag_prompt` renders from `retrieval.top_k` abstracts focused within
`retrieval.max_chars`: the fact's paper among distractors from other training papers) and answer citing its
excerpt ([n]); `raft_distractor_share` more with distractors only, answered from memory, citing nothing. The papers
of `raft_reading_share` are learnt only by reading (their facts in RAFT rows alone), and `raft_read_facts` more facts
asked of each abstract are trained only over their paper's excerpt, cited, never closed-book (reading practice).

Writes (exactly the outs of the `generate` stage in dvc.yaml):
- `artifacts/generate/train.jsonl`, `artifacts/generate/eval.jsonl`: one pair per line,
  `{question, answer, doi, title, published, prompt_id, model, response_id, chunk, fact_id, variant}`; `fact_id` =
  the first 16 hex of sha256(doi + the fact's variant-0 question), `variant` 0 = the pair as first written, 1..K-1
  its rewordings (prompt_id `augment`). Split by paper (no paper in both; a fact's variants stay together),
  deterministic from `base.seed`, the eval split holding about `generate.eval_size` facts from at most
  `generate.eval_max_paper_share` of the papers, variant 0 only.
- `artifacts/generate/seen.jsonl` (always written, may be empty): one kept reworded question per line,
  `{question, answer (the fact's variant-0 answer), doi, title, published, prompt_id: "paraphrase", model,
  response_id, chunk, fact_id, variant: 0, source_question (the fact's variant-0 question)}`; never trained on.
- `artifacts/generate/failures.jsonl`: `{doi, title, prompt_id, chunk, fact_id, reason, attempts}` for every request
  that still failed after its retries (and every paper that could not be sent); a fact whose augment request failed
  keeps its variant 0.
- `cache/generate/responses.sqlite`: the response cache (SQLite, one fsync'd commit per response; DVC persists it),
  keyed by (endpoint, model, template hash, content hash, sampling params), for all three kinds of request: a
  rerun, or a resume after `kill -9`, repeats no request that had been answered.
- `reports/generate.json`: requests, retries, failures, facts, variants, seen questions kept/dropped, pairs,
  duplicates, token usage and cost (usage x price) per kind of request, the `response_format` the endpoint accepted;
  `metrics/generate.json` its headline numbers (facts, pairs, requests, failures, cost).

`generate.mode: batch` sends each round as an OpenAI Batch API job (`batch`: upload, create, poll with backoff,
download its output and error files) at `batch_price_factor` of the price, then online what the job did not answer
(failed lines, the rest of an expired job); the job ids are kept in the response cache, so a rerun resumes a running
job and never submits one twice, and online and batch replies share the cache. `--dry-run` prices the mode's
requests. Prompt tokens (rate limits, estimate) are counted by tiktoken where the model's encoding is cached
(`qrb.llm`; never downloaded), else as ~4 characters per token.

The `response_format` is negotiated once per endpoint: JSON schema, else `json_object`, else instructions only,
whatever status code carries the refusal. The run stops with one line and a non-zero exit (outputs left as they
were; answered requests cached) when `max_consecutive_failures` requests in a row fail with the same error
(ConfigError when no retry can fix it, TransientError when the endpoint is down or keeps failing), and when it ends
with 0 pairs (DataError).

The API key is read from the environment only and is never written anywhere (not even in a failure reason).

The parts, each usable alone: `units` (the requests to make, the cost estimate), `replies` (the tolerant reply
parser), `cache` (the crash-safe response cache), `client` (rate limiter + request loop over `qrb.llm`), `batch`
(batch mode), `assemble` (pure: responses -> train/eval rows, failures, metrics), `run` (the I/O).
This module stays light (no openai import).
"""

from __future__ import annotations

import dataclasses
import re

SECTION = "generate"
BASE_KEYS = ("seed",)
OTHER_SECTIONS = ("retrieval.top_k", "retrieval.max_chars")  # the RAFT rows' excerpts, shown as the apps show them
SYSTEM_PROMPT = "system"  # prompts/system.txt: the system message of every request (not a template id)
AUGMENT, PARAPHRASE, INVENT = "augment", "paraphrase", "invent"  # prompts/<these>.txt: the fact-level templates
MODES = ("online", "batch")


@dataclasses.dataclass(frozen=True)
class GenerateParams:
    base_url: str               # any OpenAI-compatible endpoint
    model: str
    api_key_env: str            # the NAME of the environment variable holding the key
    prompts: tuple[str, ...]    # template ids: prompts/<id>.txt
    pairs_per_prompt: int
    temperature: float
    max_tokens: int
    concurrency: int            # requests in flight at once
    requests_per_minute: int    # client-side limits (your account tier); 0 = no limit
    tokens_per_minute: int
    timeout_s: float            # per request
    max_retries: int            # per request, after the first try
    backoff_base_s: float       # exponential backoff with jitter: base * 2^attempt, capped
    backoff_max_s: float
    near_duplicate_jaccard: float  # questions whose word sets overlap this much are near-duplicates
    eval_size: int              # ~facts in the eval split (whole papers)
    eval_max_paper_share: float  # ... from at most this share of the papers with facts
    augment_variants: int       # K: each training fact in K differently-worded pairs (1 = off)
    seen_questions: int         # training facts that get a reworded, never-trained question (0 = none)
    seen_max_jaccard: float     # a reworded question is kept only below this word-set Jaccard with every train one
    abstain_share: float        # abstention rows (questions about invented papers) per training row; 0 = none
    invented_questions: int     # the `invented` question set's size (scored, never trained); 0 = none
    raft_gold_share: float      # training facts also asked with their paper's excerpt among distractors (RAFT)
    raft_distractor_share: float  # ... with distractor excerpts only; the two shares pick disjoint facts
    raft_reading_share: float   # training papers learnt only by reading: their facts in RAFT rows alone (raft.py)
    raft_read_facts: int        # more facts asked of each paper, each trained only over its paper's excerpt, cited
    max_consecutive_failures: int  # circuit breaker: this many requests in a row failing alike stop the run
    price_input_per_1m: float   # USD per 1M tokens
    price_output_per_1m: float
    max_cost_usd: float         # refuse to start when the estimate exceeds this; stop spending past it
    mode: str                   # online (chat-completions requests) | batch (the OpenAI Batch API, then online)
    batch_price_factor: float   # a batch reply's price / the online price (OpenAI: 0.5)
    batch_poll_s: float         # first wait between polls of a batch's status; doubles each poll ...
    batch_poll_max_s: float     # ... up to this

    @property
    def facts_asked(self) -> int:
        """Facts a QA request asks for: those learnt closed-book, then the reading practice's."""
        return self.pairs_per_prompt + self.raft_read_facts

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError("params: `generate.api_key_env` must be the NAME of an environment variable "
                             "(e.g. OPENAI_API_KEY), not the key itself")
        if not self.prompts:
            raise ValueError("params: `generate.prompts` must name at least one template")
        for pid in self.prompts:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", pid) or pid in (SYSTEM_PROMPT, AUGMENT, PARAPHRASE, INVENT):
                raise ValueError(f"params: `generate.prompts` entry {pid!r} must be a QA template id "
                                 f"(lowercase letters, digits, - or _; not {SYSTEM_PROMPT!r}, {AUGMENT!r} or "
                                 f"{PARAPHRASE!r})")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("params: `generate.prompts` lists a template twice")
        for name in ("pairs_per_prompt", "max_tokens", "concurrency", "augment_variants", "max_consecutive_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"params: `generate.{name}` must be at least 1")
        for name in ("requests_per_minute", "tokens_per_minute", "max_retries", "eval_size", "seen_questions",
                     "abstain_share", "invented_questions", "raft_read_facts", "backoff_base_s", "backoff_max_s",
                     "price_input_per_1m", "price_output_per_1m", "max_cost_usd", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"params: `generate.{name}` must not be negative")
        if self.timeout_s <= 0:
            raise ValueError("params: `generate.timeout_s` must be positive")
        if self.mode not in MODES:
            raise ValueError(f"params: `generate.mode` must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("batch_price_factor", "near_duplicate_jaccard", "eval_max_paper_share"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"params: `generate.{name}` must be in (0, 1]")
        if not 0 < self.batch_poll_s <= self.batch_poll_max_s:
            raise ValueError("params: `generate.batch_poll_s` must be positive and at most `generate.batch_poll_max_s`")
        if not 0 < self.seen_max_jaccard < 1:
            raise ValueError("params: `generate.seen_max_jaccard` must be in (0, 1)")
        if not 0 <= self.raft_reading_share < 1:
            raise ValueError("params: `generate.raft_reading_share` is a share of the training papers: 0 <= it < 1")
        if not (0 <= self.raft_gold_share <= 1 and 0 <= self.raft_distractor_share <= 1
                and self.raft_gold_share + self.raft_distractor_share <= 1):
            raise ValueError("params: `generate.raft_gold_share` and `generate.raft_distractor_share` are shares of "
                             "the training facts: each in 0..1, together at most 1")
        if not re.match(r"https?://", self.base_url):
            raise ValueError("params: `generate.base_url` must be an http(s) URL")


PARAMS_CLASS = GenerateParams
