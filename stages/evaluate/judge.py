"""The optional LLM grader: SimpleQA's grading shape (question, gold target, predicted answer -> CORRECT / INCORRECT /
NOT_ATTEMPTED) through any OpenAI-compatible endpoint (`evaluate.grader`: base_url, model, api_key_env), with the
rivals' timeout, bounded retries (the SDK's own, honouring Retry-After) and concurrency, through `qrb.llm`.

The prompt is prompts/grade.txt (`{{question}}`, `{{target}}`, `{{aliases}}`, `{{answer}}`). The reply is read from
its last JSON object with a "grade", else from its last line, and only when that line names exactly one grade: never
from the first grade word anywhere, so a reply that quotes the question or reasons "this is not INCORRECT because..."
is decided by its conclusion. No response_format is sent (not every server supports one). Grades are cached in
cache/evaluate/grader.sqlite (`qrb.llm.Cache`, a persistent DVC out), keyed by endpoint, model, prompt and the texts:
a rerun on the same answers sends no request. A grader whose key is missing, that rejects it, keeps failing or
replies no grade is *skipped* with the reason (the grades it gave stay cached) and the offline grades stand for every
model: a grader that decided only some answers could not be compared across models.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qrb import llm
from qrb.errors import ConfigError
from qrb.grade import CORRECT, INCORRECT, NOT_ATTEMPTED

from . import Grader

log = logging.getLogger(__name__)

CACHE = Path("cache/evaluate/grader.sqlite")
PROMPT = Path("prompts/grade.txt")
SYSTEM = "You grade a research assistant's answers against a gold target. You reply with JSON only."
_WORDS = {"CORRECT": CORRECT, "INCORRECT": INCORRECT, "NOT_ATTEMPTED": NOT_ATTEMPTED, "A": CORRECT, "B": INCORRECT,
          "C": NOT_ATTEMPTED}  # A/B/C: SimpleQA's own letters
_GRADE = re.compile(r"\b(NOT[_ ]ATTEMPTED|INCORRECT|CORRECT)\b", re.I)
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


@dataclass(frozen=True)
class Item:
    question: str
    target: str
    aliases: tuple[str, ...]
    answer: str


def load_prompt(path: Path = PROMPT) -> str:
    if not path.exists():
        raise ConfigError(f"{path} not found (the LLM grader's prompt; `evaluate.grader` is set)")
    return path.read_text(encoding="utf-8")


def render(template: str, item: Item) -> str:
    fields = {"question": item.question, "target": item.target, "aliases": "\n".join(item.aliases) or "(none)",
              "answer": item.answer}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: fields.get(m.group(1), m.group()), template)


def _word(text: str) -> str | None:
    return _WORDS.get(re.sub(r"[\s_]+", "_", text.strip().upper()))


def parse_grade(reply: str) -> str | None:
    """The grade of a reply: its last JSON object's "grade", else its last line when that names exactly one grade (or
    is one of SimpleQA's letters A/B/C); None when neither says."""
    text = _THINK.sub(" ", reply or "")
    for m in reversed(list(re.finditer(r"\{[^{}]*\}", text))):
        try:
            obj = json.loads(m.group())
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("grade"), str):
            return _word(obj["grade"])
    lines = [line for line in text.splitlines() if line.strip()]
    last = re.sub(r"[*`#>\"'.:!()\[\]]", " ", lines[-1]) if lines else ""
    last = re.sub(r"\bnot\s+(in)?correct\b", lambda m: "CORRECT" if m.group(1) else "INCORRECT", last, flags=re.I)
    if re.fullmatch(r"\s*(?:grade\s*)?[ABC]\s*", last, re.I):
        return _word(last.split()[-1])
    found = {_word(m.group(1)) for m in _GRADE.finditer(last)}
    return found.pop() if len(found) == 1 else None


@dataclass
class Grades:
    grades: list[str] | None = None   # one per item, in order; None when skipped
    skipped: str | None = None
    requests: int = 0                 # sent this run (0 when every grade was cached)


def llm_grades(grader: Grader, items: Sequence[Item], cache: llm.Cache | None, *, timeout_s: float, max_retries: int,
               concurrency: int, env: Mapping[str, str] | None = None, template: str | None = None) -> Grades:
    """Every item's grade (from `cache`, else the endpoint; each new one is committed to `cache` as it comes), or the
    skip reason (after one request failed for good, none more is sent). Never raises for endpoint trouble."""
    template = load_prompt() if template is None else template
    keys = [llm.key(grader.base_url, grader.model, SYSTEM, template, it.question, it.target, list(it.aliases),
                    it.answer) for it in items]
    have = cache.get_many(set(keys)) if cache else {}
    todo = sorted({k: it for k, it in zip(keys, items) if k not in have}.items())
    if todo:
        api_key = llm.api_key(grader.api_key_env, env)
        if not api_key:
            return Grades(skipped=f"API key variable {grader.api_key_env} is not set ({len(todo)} grades not cached)")

        def one(key_item: tuple[str, Item]) -> str:
            key, it = key_item
            r = client.chat.completions.create(
                model=grader.model, temperature=0.0, max_tokens=256,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": render(template, it)}])
            if (g := parse_grade(reply := llm.reply_text(r))) is None:
                raise ValueError(f"a reply with no grade: {' '.join(reply.split())[:80]!r}")
            if cache:
                cache.put(key, g)
            have[key] = g
            return key

        with llm.client(grader.base_url, api_key, timeout_s, max_retries) as client:
            sent, raised = llm.fan_out(one, todo, concurrency)
        if raised:
            reason = llm.failure(raised[0], api_key, timeout_s).reason
            log.warning("grader %s at %s skipped: %s", grader.model, grader.base_url, reason)
            return Grades(skipped=reason, requests=len(sent) - sent.count(None) + len(raised))
    return Grades(grades=[have[k] for k in keys], requests=len(todo))
