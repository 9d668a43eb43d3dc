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
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import sqlite3
import sys
import threading
import time
import unicodedata
import zlib
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl, write_json, write_jsonl
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "generate"
BASE_KEYS = ("seed",)

PAPERS = Path("artifacts/scrape/papers.jsonl")
PROMPTS_DIR = Path("prompts")
SYSTEM_PROMPT = "system"
OUT_DIR = Path("artifacts/generate")
TRAIN, EVAL, FAILURES = OUT_DIR / "train.jsonl", OUT_DIR / "eval.jsonl", OUT_DIR / "failures.jsonl"
CACHE_DIR = Path("cache/generate")
CACHE_DB = CACHE_DIR / "responses.sqlite"
METRICS = Path("metrics/generate.json")

CHUNK_CHARS = 8000              # full text (when the scrape stage fetched it) is sent in chunks of about this size
EST_OUTPUT_TOKENS_PER_PAIR = 90  # for the cost estimate: a pair is ~60-120 tokens of JSON
PAIR_SCHEMA = {
    "type": "object",
    "properties": {"pairs": {"type": "array", "items": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
        "required": ["question", "answer"], "additionalProperties": False}}},
    "required": ["pairs"], "additionalProperties": False,
}


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


class FatalError(ConfigError):
    """An error no retry can fix (bad key, unknown model): the run stops, outputs untouched."""


# ---------------------------------------------------------------------------------------------------------------
# Requests: one per (paper, chunk, template)

@dataclasses.dataclass
class Unit:
    doi: str
    title: str
    published: str | None
    prompt_id: str
    chunk: int
    messages: list[dict[str, str]]
    key: str                  # cache key
    est_prompt_tokens: int


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def est_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token for English)."""
    return max(1, math.ceil(len(text) / 4))


_DELIM = re.compile(r"<\s*/?\s*paper\s*>", re.I)


def _clean(text: Any) -> str:
    return _DELIM.sub("[paper]", " ".join(str(text or "").split()))


def paper_chunks(paper: dict[str, Any]) -> list[str]:
    """The texts sent for a paper: chunk 0 is the abstract; full text (if scraped) follows in ~CHUNK_CHARS pieces."""
    chunks = [_clean(paper.get("abstract"))] if (paper.get("abstract") or "").strip() else []
    full = paper.get("full_text")
    if isinstance(full, str) and full.strip():
        paras, cur = [p for p in re.split(r"\n\s*\n", full) if p.strip()], ""
        for para in paras:
            if cur and len(cur) + len(para) > CHUNK_CHARS:
                chunks.append(_clean(cur))
                cur = ""
            cur += para + "\n\n"
        if cur.strip():
            chunks.append(_clean(cur))
    return chunks


def render_paper(paper: dict[str, Any], chunk: int, text: str, n_chunks: int) -> str:
    label = "Abstract" if chunk == 0 else "Text"
    lines = ["<paper>", f"Title: {_clean(paper.get('title'))}", f"DOI: {_clean(paper.get('doi'))}"]
    if paper.get("published"):
        lines.append(f"Published: {_clean(paper.get('published'))}")
    if chunk:
        lines.append(f"Part: {chunk} of {n_chunks - 1} of the full text")
    lines += [f"{label}:", text, "</paper>"]
    return "\n".join(lines)


def build_units(papers: list[dict[str, Any]], templates: dict[str, str], system: str, p: GenerateParams,
                seed: int) -> tuple[list[Unit], list[dict[str, Any]]]:
    """Every request to make, and the papers that cannot be sent (as failure rows)."""
    units, failures = [], []
    sampling = {"temperature": p.temperature, "max_tokens": p.max_tokens, "n_pairs": p.pairs_per_prompt,
                "seed": seed}
    endpoint = p.base_url.rstrip("/")
    for paper in papers:
        doi, title = paper.get("doi"), _clean(paper.get("title"))
        if not doi:
            failures.append({"doi": doi, "title": title, "prompt_id": None, "chunk": None, "attempts": 0,
                             "reason": f"paper has no DOI ({paper.get('url')})"})
            continue
        chunks = paper_chunks(paper)
        if not chunks:
            failures.append({"doi": doi, "title": title, "prompt_id": None, "chunk": None, "attempts": 0,
                             "reason": "paper has no abstract or text"})
            continue
        for ci, text in enumerate(chunks):
            block = render_paper(paper, ci, text, len(chunks))
            for pid in p.prompts:
                template = templates[pid]
                user = template.replace("{{n}}", str(p.pairs_per_prompt)).replace("{{paper}}", block)
                key = _hash(json.dumps({"endpoint": endpoint, "model": p.model,
                                        "template": _hash(system + "\x00" + template), "paper": _hash(block),
                                        "sampling": sampling}, sort_keys=True))
                units.append(Unit(doi=doi, title=title, published=paper.get("published"), prompt_id=pid,
                                  chunk=ci, key=key, est_prompt_tokens=est_tokens(system + user) + 8,
                                  messages=[{"role": "system", "content": system},
                                            {"role": "user", "content": user}]))
    return units, failures


# ---------------------------------------------------------------------------------------------------------------
# Parsing replies (tolerant: schema-following JSON, fenced JSON, prose around JSON, bare lists)

_QKEYS = ("question", "q", "prompt", "query")
_AKEYS = ("answer", "a", "response", "completion")


def _pairs_from(obj: Any) -> list[dict[str, str]]:
    if isinstance(obj, list):
        return [pair for item in obj for pair in _pairs_from(item)]
    if isinstance(obj, dict):
        low = {str(k).lower(): v for k, v in obj.items()}
        q = next((low[k] for k in _QKEYS if k in low), None)
        a = next((low[k] for k in _AKEYS if k in low), None)
        if isinstance(q, str) and isinstance(a, str):
            return [{"question": q, "answer": a}]
        return [pair for v in obj.values() if isinstance(v, (list, dict)) for pair in _pairs_from(v)]
    return []


def parse_pairs(content: str | None) -> list[dict[str, str]]:
    """Question/answer pairs in a reply; [] when there are none (invalid JSON counts as none)."""
    if not content:
        return []
    text = content.strip()
    try:
        found = _pairs_from(json.loads(text))
    except ValueError:
        found = []
        decoder = json.JSONDecoder()
        pos = 0
        while True:
            m = re.compile(r"[\[{]").search(text, pos)
            if not m:
                break
            try:
                obj, end = decoder.raw_decode(text, m.start())
            except ValueError:
                pos = m.start() + 1
                continue
            found += _pairs_from(obj)
            pos = end
    out, seen = [], set()
    for pair in found:
        q, a = " ".join(pair["question"].split()), " ".join(pair["answer"].split())
        if q and a and q not in seen:
            seen.add(q)
            out.append({"question": q, "answer": a})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Response cache: SQLite, one durable commit per response

class ResponseCache:
    """SQLite (WAL, synchronous=FULL). During a run, one writer thread owns the writes and commits them in groups
    (all replies that arrived during the previous fsync), so fsyncs neither stall the event loop nor serialise the
    requests; a reply counts as done only once its commit has returned."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, created REAL NOT NULL, "
                        "doi TEXT, prompt_id TEXT, chunk INTEGER, value TEXT NOT NULL)")
        self.db.commit()
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def keys(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM responses")}

    def get_many(self, keys: set[str]) -> dict[str, dict[str, Any]]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM responses") if k in keys}

    @staticmethod
    def _row(unit: Unit, value: dict[str, Any]) -> tuple:
        return (unit.key, time.time(), unit.doi, unit.prompt_id, unit.chunk,
                json.dumps(value, ensure_ascii=False, sort_keys=True))

    def _writer(self) -> None:
        while True:
            batch = [self.queue.get()]
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            items = [b for b in batch if b is not None]
            error: BaseException | None = None
            if items:
                try:
                    self.db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                                        [self._row(u, v) for u, v, _, _ in items])
                    self.db.commit()
                except BaseException as e:  # handed to the waiting requests
                    error = e
            for _, _, loop, fut in items:
                try:
                    loop.call_soon_threadsafe(_settle, fut, error)
                except RuntimeError:  # the run was interrupted and its loop closed; the rows are committed
                    pass
            if len(items) < len(batch):
                return

    async def aput(self, unit: Unit, value: dict[str, Any]) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._writer, name="generate-cache", daemon=True)
            self.thread.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.queue.put((unit, value, loop, fut))
        await fut

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.close()


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if not fut.done():
        fut.set_exception(error) if error else fut.set_result(None)


# ---------------------------------------------------------------------------------------------------------------
# Rate limiting and the request loop

class RateLimiter:
    """Sliding one-minute window over requests and (estimated) tokens; 0 disables a limit."""

    def __init__(self, rpm: int, tpm: int) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.events: collections.deque[tuple[float, int]] = collections.deque()
        self.tokens = 0
        self.lock = asyncio.Lock()

    async def acquire(self, tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.events and self.events[0][0] <= now - 60:
                    self.tokens -= self.events.popleft()[1]
                ok_r = not self.rpm or len(self.events) < self.rpm
                ok_t = not self.tpm or self.tokens + tokens <= self.tpm or not self.events
                if ok_r and ok_t:
                    self.events.append((now, tokens))
                    self.tokens += tokens
                    return
                await asyncio.sleep(max(self.events[0][0] + 60 - now, 0.01))


@dataclasses.dataclass
class RunStats:
    api_requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0       # billed this run, failed attempts included
    completion_tokens: int = 0
    errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def cost(self, p: GenerateParams) -> float:
        return cost_usd(self.prompt_tokens, self.completion_tokens, p)


def cost_usd(prompt_tokens: int, completion_tokens: int, p: GenerateParams) -> float:
    return prompt_tokens * p.price_input_per_1m / 1e6 + completion_tokens * p.price_output_per_1m / 1e6


def _retry_after(exc: Any) -> float | None:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except (TypeError, ValueError):
        pass
    return None


def _scrub(text: str, secret: str | None) -> str:
    text = " ".join(str(text).split())[:300]
    return text.replace(secret, "***") if secret else text


async def run_requests(units: list[Unit], p: GenerateParams, seed: int, client: Any, cache: ResponseCache,
                       secret: str | None = None, progress: Any = None
                       ) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], RunStats]:
    """Answer every unit from the cache or the endpoint. Returns (responses by key, failure rows, stats)."""
    import openai

    sem = asyncio.Semaphore(p.concurrency)
    limiter = RateLimiter(p.requests_per_minute, p.tokens_per_minute)
    rng = random.Random(seed)
    stats = RunStats()
    responses: dict[str, dict[str, Any]] = {}
    failures: list[dict[str, Any]] = []
    use_schema = [True]
    fatal: list[str] = []

    def backoff(attempt: int) -> float:
        d = min(p.backoff_max_s, p.backoff_base_s * 2 ** attempt)
        return d / 2 + rng.uniform(0, d / 2)

    preloaded = cache.get_many({u.key for u in units})

    async def one(unit: Unit) -> None:
        if unit.key in preloaded:
            responses[unit.key] = preloaded[unit.key]
            return
        reason, attempts, attempt = "not attempted", 0, 0
        while attempt <= p.max_retries:
            if fatal:
                reason = "run stopped: " + fatal[0]
                break
            if p.max_cost_usd and stats.cost(p) > p.max_cost_usd:
                reason = f"budget exhausted: spent ${stats.cost(p):.4f} > generate.max_cost_usd"
                break
            delay = None
            await limiter.acquire(unit.est_prompt_tokens + p.max_tokens)
            async with sem:
                attempts += 1
                stats.api_requests += 1
                kwargs: dict[str, Any] = {}
                if use_schema[0]:
                    kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                        "name": "qa_pairs", "strict": True, "schema": PAIR_SCHEMA}}
                try:
                    resp = await client.chat.completions.create(
                        model=p.model, messages=unit.messages, temperature=p.temperature,
                        max_tokens=p.max_tokens, seed=seed, timeout=p.timeout_s, **kwargs)
                except openai.RateLimitError as e:
                    reason, delay = "HTTP 429 rate limited", max(_retry_after(e) or 0.0, backoff(attempt))
                except openai.APITimeoutError:
                    reason = f"timed out after {p.timeout_s:g} s"
                except openai.APIConnectionError as e:
                    reason = f"connection error: {_scrub(e, secret)}"
                except openai.InternalServerError as e:
                    reason = f"HTTP {e.status_code} server error"
                except openai.BadRequestError as e:
                    msg = str(e).lower()
                    if use_schema[0] and ("response_format" in msg or "json_schema" in msg):
                        log.warning("generate: the endpoint rejects JSON-schema response_format; "
                                    "falling back to prompt-only JSON and the tolerant parser")
                        use_schema[0] = False
                        continue  # not counted as a retry
                    reason = f"HTTP 400 bad request: {_scrub(e, secret)}"
                    break
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                    fatal.append(f"HTTP {e.status_code} from the endpoint: {_scrub(e, secret)}")
                    reason = "run stopped: " + fatal[0]
                    break
                except openai.APIStatusError as e:
                    reason = f"HTTP {e.status_code}: {_scrub(e, secret)}"
                    if e.status_code < 500 and e.status_code not in (408, 409):
                        break
                else:
                    usage = getattr(resp, "usage", None)
                    pt = int(getattr(usage, "prompt_tokens", 0) or 0)
                    ct = int(getattr(usage, "completion_tokens", 0) or 0)
                    stats.prompt_tokens += pt
                    stats.completion_tokens += ct
                    choice = resp.choices[0] if resp.choices else None
                    content = choice.message.content if choice else None
                    finish = choice.finish_reason if choice else None
                    pairs = parse_pairs(content)
                    if finish == "length":
                        reason = (f"truncated reply (finish_reason=length at max_tokens={p.max_tokens}); "
                                  "raise generate.max_tokens")
                    elif not pairs:
                        reason = "reply is not valid JSON with question/answer pairs"
                    else:
                        value = {"response_id": resp.id, "model": resp.model or p.model, "content": content,
                                 "finish_reason": finish, "prompt_tokens": pt, "completion_tokens": ct}
                        await cache.aput(unit, value)  # durable before the request counts as done
                        responses[unit.key] = value
                        return
            stats.errors[reason.split(":")[0].split(" (")[0]] += 1
            attempt += 1
            if attempt <= p.max_retries:
                stats.retries += 1
                await asyncio.sleep(delay if delay is not None else backoff(attempt - 1))
        failures.append({"doi": unit.doi, "title": unit.title, "prompt_id": unit.prompt_id, "chunk": unit.chunk,
                         "attempts": attempts, "reason": reason})

    async def tracked(unit: Unit) -> None:
        try:
            await one(unit)
        finally:
            if progress is not None:
                progress(unit, responses.get(unit.key), stats)

    await asyncio.gather(*(tracked(u) for u in units))
    if fatal:
        raise FatalError(fatal[0])
    return responses, failures, stats


# ---------------------------------------------------------------------------------------------------------------
# Pure post-processing: rows, de-duplication, split

def rows_from_responses(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams
                        ) -> list[dict[str, Any]]:
    order = {pid: i for i, pid in enumerate(p.prompts)}
    rows = []
    for unit in sorted(units, key=lambda u: (u.doi, u.chunk, order[u.prompt_id])):
        value = responses.get(unit.key)
        if value is None:
            continue
        for pair in parse_pairs(value["content"])[:p.pairs_per_prompt]:
            rows.append({"question": pair["question"], "answer": pair["answer"], "doi": unit.doi,
                         "title": unit.title, "published": unit.published, "prompt_id": unit.prompt_id,
                         "model": value["model"], "response_id": value["response_id"], "chunk": unit.chunk})
    return rows


def _norm_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return re.findall(r"[^\W_]+", text)


def dedup_questions(rows: list[dict[str, Any]], threshold: float) -> tuple[list[dict[str, Any]], int, int]:
    """Drop exact (after normalisation) and near-duplicate questions (word-set Jaccard >= threshold), keeping the
    first. Near-duplicate candidates come from MinHash banding, then are verified exactly."""
    kept: list[dict[str, Any]] = []
    kept_sets: list[frozenset[str]] = []
    exact: set[str] = set()
    buckets: dict[tuple[int, int, int], list[int]] = collections.defaultdict(list)
    n_exact = n_near = 0
    n_hash, rows_per_band = 24, 2
    for row in rows:
        words = _norm_words(row["question"])
        norm = " ".join(words)
        if norm in exact:
            n_exact += 1
            continue
        wset = frozenset(words) or frozenset([norm])
        sig = [min(zlib.crc32(f"{i}:{w}".encode()) for w in wset) for i in range(n_hash)]
        bands = [(b, sig[b * rows_per_band], sig[b * rows_per_band + 1]) for b in range(n_hash // rows_per_band)]
        candidates = {j for band in bands for j in buckets.get(band, ())}
        if any(len(wset & kept_sets[j]) / len(wset | kept_sets[j]) >= threshold for j in candidates):
            n_near += 1
            continue
        exact.add(norm)
        idx = len(kept)
        kept.append(row)
        kept_sets.append(wset)
        for band in bands:
            buckets[band].append(idx)
    return kept, n_exact, n_near


def split_by_paper(rows: list[dict[str, Any]], eval_size: int, seed: int
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Whole papers go to eval (in a seeded order) while that brings its size closer to `eval_size`; at least one
    paper stays in train."""
    counts = collections.Counter(r["doi"] for r in rows)
    papers = sorted(counts)
    random.Random(seed).shuffle(papers)
    eval_papers: set[str] = set()
    total = 0
    for doi in papers:
        if total >= eval_size or len(eval_papers) >= len(papers) - 1:
            break
        if abs(total + counts[doi] - eval_size) < abs(total - eval_size):
            eval_papers.add(doi)
            total += counts[doi]
    train = [r for r in rows if r["doi"] not in eval_papers]
    evals = [r for r in rows if r["doi"] in eval_papers]
    return train, evals


def estimate(units: list[Unit], cached: set[str], p: GenerateParams) -> dict[str, Any]:
    todo = [u for u in units if u.key not in cached]
    pt = sum(u.est_prompt_tokens for u in todo)
    ct = len(todo) * min(p.max_tokens, p.pairs_per_prompt * EST_OUTPUT_TOKENS_PER_PAIR + 20)
    worst = len(todo) * p.max_tokens
    return {"requests": len(units), "requests_cached": len(units) - len(todo), "requests_to_send": len(todo),
            "est_prompt_tokens": pt, "est_completion_tokens": ct,
            "est_cost_usd": round(cost_usd(pt, ct, p), 6),
            "worst_case_cost_usd": round(cost_usd(pt, worst, p), 6)}


# ---------------------------------------------------------------------------------------------------------------
# I/O

def load_papers(path: Path = PAPERS) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"{path} not found: run the scrape stage first (dvc repro scrape)")
    papers = list(read_jsonl(path))
    if not all(isinstance(r, dict) for r in papers):
        raise DataError(f"{path}: every line must be a JSON object")
    return sorted(papers, key=lambda r: (r.get("doi") or "", r.get("url") or ""))


def load_templates(prompt_ids: tuple[str, ...], folder: Path = PROMPTS_DIR) -> tuple[str, dict[str, str]]:
    def read(pid: str) -> str:
        path = folder / f"{pid}.txt"
        if not path.exists():
            raise ConfigError(f"prompt template {path} not found (listed in generate.prompts)")
        return path.read_text(encoding="utf-8").strip()

    templates = {pid: read(pid) for pid in prompt_ids}
    for pid, text in templates.items():
        if "{{paper}}" not in text:
            raise ConfigError(f"{folder / (pid + '.txt')} has no {{{{paper}}}} placeholder")
    return read(SYSTEM_PROMPT), templates


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dry-run", action="store_true", help="print the cost estimate; call nothing, write nothing")


def run(base: dict[str, Any], p: GenerateParams, args: argparse.Namespace) -> None:
    for noisy in ("httpx", "httpcore", "openai", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    seed = base["seed"]
    papers = load_papers()
    system, templates = load_templates(p.prompts)
    units, paper_failures = build_units(papers, templates, system, p, seed)

    cache = ResponseCache(CACHE_DB) if not args.dry_run or CACHE_DB.exists() else None
    cached = cache.keys() if cache else set()
    est = estimate(units, cached, p)
    summary = (f"generate: {len(papers)} papers x {len(p.prompts)} prompts -> {est['requests']} requests "
               f"({est['requests_cached']} cached, {est['requests_to_send']} to send) to {p.model}; "
               f"estimated {est['est_prompt_tokens']} prompt + {est['est_completion_tokens']} completion tokens = "
               f"${est['est_cost_usd']:.4f} (worst case at max_tokens ${est['worst_case_cost_usd']:.4f}); "
               f"limit generate.max_cost_usd = ${p.max_cost_usd:.4f}")
    if args.dry_run:
        print(summary)
        if cache:
            cache.close()
        return
    log.info(summary)
    if est["est_cost_usd"] > p.max_cost_usd:
        cache.close()
        raise ConfigError(f"estimated cost ${est['est_cost_usd']:.4f} exceeds generate.max_cost_usd "
                         f"${p.max_cost_usd:.4f}; raise the limit or send fewer papers/prompts")
    secret = os.environ.get(p.api_key_env) or None
    if est["requests_to_send"] and not secret:
        cache.close()
        raise ConfigError(f"environment variable {p.api_key_env} is not set "
                         f"(generate.api_key_env names the variable holding the API key for {p.base_url})")

    from openai import AsyncOpenAI
    from tqdm import tqdm

    bar = tqdm(total=len({u.doi for u in units}), unit="paper", desc="generate", file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    left = collections.Counter(u.doi for u in units)
    done: dict[str, Any] = {"pairs": 0, "tokens": 0, "cost": 0.0}

    def progress(unit: Unit, value: dict[str, Any] | None, stats: RunStats) -> None:
        if value is not None:  # totals for the dataset so far, cached replies included
            done["pairs"] += min(len(parse_pairs(value["content"])), p.pairs_per_prompt)
            done["tokens"] += value["prompt_tokens"] + value["completion_tokens"]
            done["cost"] += cost_usd(value["prompt_tokens"], value["completion_tokens"], p)
        left[unit.doi] -= 1
        if left[unit.doi] == 0:
            bar.update(1)
        bar.set_postfix(pairs=done["pairs"], tokens=done["tokens"], cost=f"${done['cost']:.4f}",
                        spent_now=f"${stats.cost(p):.4f}", refresh=False)

    client = AsyncOpenAI(base_url=p.base_url, api_key=secret or "unused", max_retries=0, timeout=p.timeout_s)
    try:
        responses, failures, stats = asyncio.run(run_requests(units, p, seed, client, cache, secret, progress))
    except FatalError as e:
        raise FatalError(f"{e} (outputs left as they were; answered requests are cached)") from None
    finally:
        bar.close()
        cache.close()

    rows = rows_from_responses(units, responses, p)
    kept, n_exact, n_near = dedup_questions(rows, p.near_duplicate_jaccard)
    failures = paper_failures + failures
    with_pairs = {r["doi"] for r in kept}
    for doi in sorted({r["doi"] for r in rows} - with_pairs):
        failures.append({"doi": doi, "title": next(r["title"] for r in rows if r["doi"] == doi), "prompt_id": None,
                         "chunk": None, "attempts": 0, "reason": "every question duplicated another paper's"})
    order = {pid: i for i, pid in enumerate(p.prompts)}
    failures.sort(key=lambda f: (f["doi"] or "", f["chunk"] or 0, order.get(f["prompt_id"], -1), f["reason"]))
    train, evals = split_by_paper(kept, p.eval_size, seed)

    used = [responses[u.key] for u in units if u.key in responses]
    pt = sum(v["prompt_tokens"] for v in used)
    ct = sum(v["completion_tokens"] for v in used)
    metrics = {
        "papers": len(papers), "papers_with_pairs": len(with_pairs),
        "papers_without_pairs": len(papers) - len(with_pairs),
        "requests": len(units), "requests_answered": len(used), "requests_failed": len(units) - len(used),
        "pairs_raw": len(rows), "duplicates_exact": n_exact, "duplicates_near": n_near, "pairs": len(kept),
        "train_pairs": len(train), "eval_pairs": len(evals),
        "train_papers": len({r["doi"] for r in train}), "eval_papers": len({r["doi"] for r in evals}),
        "prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct,
        "cost_usd": round(cost_usd(pt, ct, p), 6),
        "estimated_cost_usd": est["est_cost_usd"],
        "this_run": {"api_requests": stats.api_requests, "retries": stats.retries,
                     "requests_from_cache": sum(1 for u in units if u.key in cached),
                     "prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                     "cost_usd": round(stats.cost(p), 6), "errors": dict(sorted(stats.errors.items()))},
    }
    write_jsonl(TRAIN, train)
    write_jsonl(EVAL, evals)
    write_jsonl(FAILURES, failures)
    write_json(METRICS, metrics)
    log.info("generate: %d pairs (%d train / %d eval) from %d of %d papers; %d duplicates removed; %d failed "
             "requests; %d tokens, $%.4f", len(kept), len(train), len(evals), len(with_pairs), len(papers),
             n_exact + n_near, len(units) - len(used), pt + ct, metrics["cost_usd"])



def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv, add_arguments)


if __name__ == "__main__":
    main()
