"""Rival models behind OpenAI-compatible endpoints (Gemini's OpenAI URL, OpenAI, vLLM, Ollama...), for evaluate.

Every rival answers the same questions with the same system prompt as the local models, through `qrb.llm` (timeout
and bounded retries with backoff: the SDK's own, honouring Retry-After). A rival whose API key variable is
unset, that rejects the key, or whose request still fails after its retries is *skipped* with the reason: the other
models are still scored (a rival that answered only some questions could not be compared on the same questions).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from qrb import llm
from qrb.model import prompt_messages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rival:
    name: str          # row label in the table; metrics key `rival_<name>` (non [A-Za-z0-9_-] become _)
    base_url: str      # OpenAI-compatible base URL, e.g. https://generativelanguage.googleapis.com/v1beta/openai/
    model: str         # model id at that endpoint, e.g. gemini-1.5-pro
    api_key_env: str   # the NAME of the environment variable holding the key; the key never enters params

    @property
    def key(self) -> str:
        return "rival_" + re.sub(r"[^A-Za-z0-9_-]+", "_", self.name)


@dataclass
class RivalAnswers:
    rival: Rival
    answers: list[str] | None = None     # one per question, in order; None when skipped
    skipped: str | None = None           # why, when skipped
    failures: list[str] = field(default_factory=list)


def ask_rival(rival: Rival, questions: Sequence[str], system_prompt: str, *, max_tokens: int, temperature: float,
              timeout_s: float, max_retries: int, concurrency: int,
              env: Mapping[str, str] | None = None) -> RivalAnswers:
    """All answers of one rival, or the reason it is skipped (after one question failed for good, no more requests
    are spent on it). Never raises for endpoint trouble."""
    key = llm.api_key(rival.api_key_env, env)
    if not key:
        return RivalAnswers(rival, skipped=f"API key variable {rival.api_key_env} is not set")

    def one(q: str) -> str:
        r = client.chat.completions.create(model=rival.model, messages=prompt_messages(system_prompt, q),
                                           max_tokens=max_tokens, temperature=temperature)
        if not r.choices:
            raise ValueError("a reply with no choices")
        return llm.reply_text(r).strip()

    with llm.client(rival.base_url, key, timeout_s, max_retries) as client:
        answers, raised = llm.fan_out(one, questions, concurrency)
    if raised:
        failures = [llm.failure(e, key, timeout_s).reason for e in raised]
        log.warning("rival %s (%s at %s) skipped: %s", rival.name, rival.model, rival.base_url, failures[0])
        return RivalAnswers(rival, skipped=failures[0], failures=failures)
    return RivalAnswers(rival, answers=[a or "" for a in answers])
