"""Rival models behind OpenAI-compatible endpoints (Gemini's OpenAI URL, OpenAI, vLLM, Ollama...), for evaluate.

Every rival answers the same questions with the same system prompt as the local models, through the openai SDK
(timeout and bounded retries with backoff: the SDK's own, honouring Retry-After). A rival whose API key variable is
unset, that rejects the key, or whose request still fails after its retries is *skipped* with the reason: the other
models are still scored (a rival that answered only some questions could not be compared on the same questions).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qrb.chat import prompt_messages

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


def failure_reason(e: BaseException) -> str:
    """One line saying why a request failed for good (no key in it)."""
    import openai

    if isinstance(e, openai.AuthenticationError):
        return "the endpoint rejected the API key (401)"
    if isinstance(e, openai.APITimeoutError):
        return "requests timed out (after the SDK's retries)"
    if isinstance(e, openai.APIConnectionError):
        return f"cannot connect ({type(e.__cause__).__name__ if e.__cause__ else 'connection error'})"
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        msg = " ".join(str(body.get("message") or getattr(e, "message", "") or e).split())[:160]
        return f"HTTP {e.status_code} after the SDK's retries: {msg}"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"


def ask_rival(rival: Rival, questions: Sequence[str], system_prompt: str, *, max_tokens: int, temperature: float,
              timeout_s: float, max_retries: int, concurrency: int,
              env: Mapping[str, str] | None = None) -> RivalAnswers:
    """All answers of one rival, or the reason it is skipped. Never raises for endpoint trouble."""
    import openai

    env = os.environ if env is None else env
    key = env.get(rival.api_key_env)
    if not key:
        return RivalAnswers(rival, skipped=f"API key variable {rival.api_key_env} is not set")
    client = openai.OpenAI(base_url=rival.base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)
    failed: list[BaseException] = []

    def one(q: str) -> str | None:
        if failed:  # one question already failed for good: don't spend more requests on a skipped rival
            return None
        try:
            r = client.chat.completions.create(model=rival.model, messages=prompt_messages(system_prompt, q),
                                               max_tokens=max_tokens, temperature=temperature)
        except Exception as e:  # noqa: BLE001 - any failure after retries skips the rival, with its reason
            failed.append(e)
            return None
        if not r.choices:
            failed.append(ValueError("a reply with no choices"))
            return None
        return (r.choices[0].message.content or "").strip()

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            answers = list(pool.map(one, questions))
    finally:
        client.close()
    if failed:
        reason = failure_reason(failed[0])
        log.warning("rival %s (%s at %s) skipped: %s", rival.name, rival.model, rival.base_url, reason)
        return RivalAnswers(rival, skipped=reason, failures=[failure_reason(e) for e in failed])
    return RivalAnswers(rival, answers=[a or "" for a in answers])
