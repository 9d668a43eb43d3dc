"""Generate stage: question/answer pairs from papers through any OpenAI-compatible chat-completions endpoint.

Run from the repository (or workspace) root:

    python -m stages.generate            # needs the API key in the variable named by `generate.api_key_env`
    python -m stages.generate --dry-run  # prints the request count and cost estimate, calls nothing, writes nothing

Reads `params.yaml` (`generate:`, `base.seed`), `artifacts/scrape/papers.jsonl` and the prompt templates
`prompts/system.txt` + `prompts/<id>.txt` for each id in `generate.prompts` (`{{n}}` = pairs per prompt, `{{paper}}` =
the paper, delimited as untrusted data between `<paper>` and `</paper>`).

Writes (exactly the outs of the `generate` stage in dvc.yaml):
- `artifacts/generate/train.jsonl`, `artifacts/generate/eval.jsonl`: one pair per line,
  `{question, answer, doi, title, published, prompt_id, model, response_id, chunk}`; split by paper (no paper in
  both), deterministic from `base.seed`, the eval split holding about `generate.eval_size` pairs; exact and
  near-duplicate questions removed.
- `artifacts/generate/failures.jsonl`: `{doi, title, prompt_id, chunk, reason, attempts}` for every request that still
  failed after its retries (and every paper that could not be sent); the stage completes regardless.
- `cache/generate/responses.sqlite`: the response cache (SQLite, one fsync'd commit per response; DVC persists it),
  keyed by (endpoint, model, template hash, paper content hash, sampling params): a rerun, or a resume after
  `kill -9`, repeats no request that had been answered.
- `metrics/generate.json`: requests, retries, failures, pairs, duplicates, token usage and cost (usage x price).

The API key is read from the environment only and is never written anywhere (not even in a failure reason).

The parts, each usable alone: `units` (the requests to make, the cost estimate), `replies` (the tolerant reply
parser), `cache` (the crash-safe response cache), `client` (rate limiter + request loop), `assemble` (pure:
responses -> train/eval rows, failures, metrics), `run` (the I/O). This module stays light (no openai import).
"""

from __future__ import annotations

import dataclasses
import re

SECTION = "generate"
BASE_KEYS = ("seed",)
SYSTEM_PROMPT = "system"  # prompts/system.txt: the system message of every request (not a template id)


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
    eval_size: int              # ~pairs in the eval split (whole papers)
    price_input_per_1m: float   # USD per 1M tokens
    price_output_per_1m: float
    max_cost_usd: float         # refuse to start when the estimate exceeds this; stop spending past it

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError("params: `generate.api_key_env` must be the NAME of an environment variable "
                             "(e.g. OPENAI_API_KEY), not the key itself")
        if not self.prompts:
            raise ValueError("params: `generate.prompts` must name at least one template")
        for pid in self.prompts:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", pid) or pid == SYSTEM_PROMPT:
                raise ValueError(f"params: `generate.prompts` entry {pid!r} must be a template id "
                                 f"(lowercase letters, digits, - or _; not {SYSTEM_PROMPT!r})")
        if len(set(self.prompts)) != len(self.prompts):
            raise ValueError("params: `generate.prompts` lists a template twice")
        for name in ("pairs_per_prompt", "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"params: `generate.{name}` must be at least 1")
        for name in ("requests_per_minute", "tokens_per_minute", "max_retries", "eval_size", "backoff_base_s",
                     "backoff_max_s", "price_input_per_1m", "price_output_per_1m", "max_cost_usd", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"params: `generate.{name}` must not be negative")
        if self.timeout_s <= 0:
            raise ValueError("params: `generate.timeout_s` must be positive")
        if not 0 < self.near_duplicate_jaccard <= 1:
            raise ValueError("params: `generate.near_duplicate_jaccard` must be in (0, 1]")
        if not re.match(r"https?://", self.base_url):
            raise ValueError("params: `generate.base_url` must be an http(s) URL")


PARAMS_CLASS = GenerateParams
