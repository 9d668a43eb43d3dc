"""The smoke endpoint's chat-completions wire format: a request body -> a `chat.completion` object (pure; the same
body gives the same reply, `created` aside).

The user message's `Task:` line picks the writer: none (the QA templates) = extractive pairs (`writer`, or `facts`
for the facts focus); `augment` / `paraphrase` / `invent` = `rewriter` or `facts`; `judge` = a verdict
`{"reason", "answerable", "correct"}` (`rewriter`); `grade` = `{"grade"}` by evaluate's offline grader. A JSON-schema
`response_format` is honoured; without one the JSON comes in a Markdown fence after a line of prose, as some
endpoints do, to exercise tolerant parsers.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from qrb.grade import grade
from qrb.llm import estimate

from .facts import extract_facts, fact_wordings, invented_questions, new_wording
from .rewriter import augment_variants, judge_verdict, paraphrase_question, parse_fact_block
from .writer import extractive_pairs, last_block, parse_user_message

MODEL_ID = "qrb-smoke-extractive"
FINGERPRINT = "qrb-smoke-endpoint: extractive smoke-test stand-in, not a language model"


def _array_key(response_format: dict[str, Any] | None) -> str:
    try:
        props = response_format["json_schema"]["schema"]["properties"]
        return next((name for name, spec in props.items() if spec.get("type") == "array"), "pairs")
    except (KeyError, TypeError, AttributeError):
        return "pairs"


_TASK = re.compile(r"^Task:\s*([a-z_]+)", re.M | re.I)


def task_of(user: str) -> str:
    """`augment`, `paraphrase`, `invent`, `judge`, `grade` or `qa` (no `Task:` line)."""
    m = _TASK.search(user)
    return m.group(1).lower() if m else "qa"


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def grade_reply(user: str) -> dict[str, str]:
    """`Task: grade` (prompts/grade.txt), in the LLM grader's reply shape {"grade": "CORRECT" | ...}."""
    aliases = [a for a in last_block(user, "also_accepted").splitlines() if a.strip() and a.strip() != "(none)"]
    return {"grade": grade(last_block(user, "predicted_answer"), last_block(user, "gold_target"), aliases,
                           last_block(user, "question")).upper()}


def _with_fact(pairs: list[dict], fact: dict) -> list[dict[str, object]]:
    """Every pair with the reply schema's key-fact fields (the fact's, where a pair does not set its own)."""
    keys = {"short_answer": "", "aliases": [], "evidence": ""}
    return [{k: v for k, v in {**keys, **{k: fact.get(k, d) for k, d in keys.items()}, **pair}.items()
             if k in ("question", "answer", *keys)} for pair in pairs]


def write_pairs(user: str) -> list[dict[str, object]]:
    """The pairs the user message asks for, by its task."""
    task = task_of(user)
    req = parse_user_message(user)
    if task == "invent":
        real = [t.strip() for t in re.findall(r"^Title:[ \t]*(.+)$", user, re.M)]
        abstracts = [a.strip() for a in re.findall(r"^Abstract:[ \t]*(.+)$", user, re.M)]
        found = invented_questions(user, req["n"], {t.lower() for t in real}, real, abstracts)
        return _with_fact([{"question": q["question"], "answer": q["title"], "short_answer": q["title"]}
                           for q in found], {})
    if task in ("augment", "paraphrase"):
        fact = parse_fact_block(user)
        title, question, answer = str(fact["title"]), str(fact["question"]), str(fact["answer"])
        if fact.get("short_answer"):  # a key fact: wordings of its question for the same short answer
            pairs = (fact_wordings(fact, req["n"]) if task == "augment"
                     else [{"question": new_wording(fact), "answer": answer}])
            return _with_fact(pairs, fact)
        if task == "augment":
            return _with_fact(augment_variants(title, question, answer, req["n"]), fact)
        asked = [str(q) for q in fact["asked"]] or [question]  # type: ignore[union-attr]
        return _with_fact([{"question": paraphrase_question(title, answer, asked), "answer": answer}]
                          if answer else [], fact)
    if req["focus"] == "facts":
        return _with_fact(extract_facts(req["title"], req["abstract"], req["n"]), {})
    return _with_fact(extractive_pairs(req["title"], req["abstract"], req["focus"], req["n"]), {})


def completion(body: dict[str, Any], fault: str | None = None) -> dict[str, Any]:
    """A chat.completion object for a request body (deterministic in the body)."""
    messages = body.get("messages") or []
    user = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    prompt_text = "\n".join(str(m.get("content", "")) for m in messages)
    task = task_of(user)
    judging = task in ("judge", "grade")
    pairs = [] if judging else write_pairs(user)
    rf = body.get("response_format")
    verdict = grade_reply if task == "grade" else judge_verdict
    payload = json.dumps(verdict(user) if judging else {_array_key(rf): pairs}, ensure_ascii=False)
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        content = payload
    else:
        content = (f"Here is my verdict:\n```json\n{payload}\n```" if judging
                   else f"Here are the question-answer pairs:\n```json\n{payload}\n```")
    finish = "stop"
    if fault == "invalid_json":
        content = '{"pairs": [{"question": "' + (pairs[0]["question"] if pairs else "What") + '", "answer": '
    elif fault == "truncated":
        content = content[: max(1, len(content) // 2)]
        finish = "length"
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]
    pt, ct = estimate(prompt_text), estimate(content)
    return {
        "id": f"chatcmpl-smoke-{digest}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL_ID,
        "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
    }
