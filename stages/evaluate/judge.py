"""The optional LLM fact judge: does an answer state the reference's key facts? (decides `facts_stated`)

Any OpenAI-compatible endpoint (`evaluate.fact_judge`: base_url, model, api_key_env), through the openai SDK with the
rivals' timeout, bounded retries (the SDK's own, honouring Retry-After) and concurrency. The judge reads question,
reference and answer and replies YES or NO; only the word is parsed, so any chat model at any endpoint serves
(no response_format: not every server supports one). Verdicts are cached in cache/evaluate/fact_judge.jsonl (a
persistent DVC out), keyed by endpoint, model, prompt and the three texts: a rerun on the same answers sends no
request. A judge whose key is missing, that rejects it, keeps failing or replies neither YES nor NO is *skipped*
with the reason (verdicts it gave are still cached), and `facts_stated` falls back to the fact-recall threshold for
every model: a judge that decided only some answers could not be compared across models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qrb.io import atomic_write_text, read_jsonl

from . import FactJudge

log = logging.getLogger(__name__)

CACHE = Path("cache/evaluate/fact_judge.jsonl")
SYSTEM = "You grade answers against a reference answer. You reply with exactly one word: YES or NO."
PROMPT = """Question: {question}

Reference answer: {reference}

Answer to grade: {answer}

Does the answer to grade state the key facts of the reference answer (its numbers, names and specific terms that \
the question does not already contain) without contradicting them? Wording and length do not matter, only the \
facts. Reply YES or NO."""
_PROMPT_ID = hashlib.sha256((SYSTEM + PROMPT).encode()).hexdigest()[:12]
_VERDICT = re.compile(r"\b(YES|NO)\b", re.I)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


@dataclass(frozen=True)
class Item:
    question: str
    reference: str
    answer: str


def cache_key(judge: FactJudge, item: Item) -> str:
    blob = json.dumps([judge.base_url, judge.model, _PROMPT_ID, item.question, item.reference, item.answer])
    return hashlib.sha256(blob.encode()).hexdigest()


def load_cache(path: Path = CACHE) -> dict[str, bool]:
    return {r["key"]: bool(r["verdict"]) for r in read_jsonl(path)} if path.exists() else {}


def save_cache(cache: Mapping[str, bool], path: Path = CACHE) -> None:
    atomic_write_text(path, "".join(json.dumps({"key": k, "verdict": v}) + "\n" for k, v in sorted(cache.items())))


def parse_verdict(reply: str) -> bool | None:
    m = _VERDICT.search(_THINK.sub(" ", reply or ""))
    return None if m is None else m.group(1).upper() == "YES"


@dataclass
class Verdicts:
    verdicts: list[bool] | None = None   # one per item, in order; None when skipped
    skipped: str | None = None
    requests: int = 0                    # sent this run (0 when every verdict was cached)


def judge_facts(judge: FactJudge, items: Sequence[Item], cache: dict[str, bool], *, timeout_s: float,
                max_retries: int, concurrency: int, env: Mapping[str, str] | None = None) -> Verdicts:
    """Every item's verdict (from `cache`, else the endpoint; new ones are added to `cache`), or the skip reason.
    Never raises for endpoint trouble."""
    import openai

    from qrb.rivals import failure_reason

    keys = [cache_key(judge, it) for it in items]
    todo = sorted({k: it for k, it in zip(keys, items) if k not in cache}.items())
    if todo:
        env = os.environ if env is None else env
        api_key = env.get(judge.api_key_env)
        if not api_key:
            return Verdicts(skipped=f"API key variable {judge.api_key_env} is not set "
                                    f"({len(todo)} verdicts not cached)")
        client = openai.OpenAI(base_url=judge.base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        failed: list[str] = []
        sent: list[str] = []

        def one(key_item: tuple[str, Item]) -> None:
            key, it = key_item
            if failed:  # one failed for good: spend no more requests on a skipped judge
                return
            sent.append(key)
            try:
                r = client.chat.completions.create(
                    model=judge.model, temperature=0.0, max_tokens=64,
                    messages=[{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": PROMPT.format(**vars(it))}])
            except Exception as e:  # noqa: BLE001 - any failure after retries skips the judge, with its reason
                failed.append(failure_reason(e))
                return
            reply = (r.choices[0].message.content or "") if r.choices else ""
            verdict = parse_verdict(reply)
            if verdict is None:
                failed.append(f"a reply that is neither YES nor NO: {' '.join(reply.split())[:80]!r}")
            else:
                cache[key] = verdict

        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                list(pool.map(one, todo))
        finally:
            client.close()
        if failed:
            log.warning("fact judge %s at %s skipped: %s", judge.model, judge.base_url, failed[0])
            return Verdicts(skipped=failed[0], requests=len(sent))
    return Verdicts(verdicts=[cache[k] for k in keys], requests=len(todo))
