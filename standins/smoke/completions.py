"""The chat-completions wire format of the smoke endpoint: a request body -> a `chat.completion` object (pure; the
same body gives the same reply, `created` aside). Every reply is labelled: model id `qrb-smoke-extractive` and a
`system_fingerprint` saying that it is a smoke-test endpoint.

The user message's `Task:` line picks the writer: none (the QA templates) = extractive pairs from the paper;
`Task: augment` = rewordings of the pair it carries; `Task: paraphrase` = one new question for the pair's answer;
`Task: judge` = a verdict `{"reason", "answerable", "correct"}` on the pair it carries, from the paper text it
carries (`rewriter`); `Task: grade` = `{"grade"}` of the answer it carries, by evaluate's offline grader (`grader`).

`response_format` with a JSON schema is honoured (the content is JSON matching the schema); without it the JSON
comes inside a Markdown code fence after a line of prose, as some endpoints do, to exercise tolerant parsers.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from typing import Any

from .facts import extract_facts, fact_wordings, invented_questions, new_wording
from .grader import grade_reply
from .rewriter import augment_variants, judge_verdict, paraphrase_question, parse_fact_block
from .writer import extractive_pairs, parse_user_message

MODEL_ID = "qrb-smoke-extractive"
FINGERPRINT = "qrb-smoke-endpoint: extractive smoke-test stand-in, not a language model"


def _array_key(response_format: dict[str, Any] | None) -> str:
    try:
        props = response_format["json_schema"]["schema"]["properties"]
        for name, spec in props.items():
            if spec.get("type") == "array":
                return name
    except (KeyError, TypeError, AttributeError):
        pass
    return "pairs"


def _tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))


_TASK = re.compile(r"^Task:\s*([a-z_]+)", re.M | re.I)


def task_of(user: str) -> str:
    """`augment`, `paraphrase`, `judge` or `qa` (no `Task:` line)."""
    m = _TASK.search(user)
    return m.group(1).lower() if m else "qa"


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
    judging = task_of(user) in ("judge", "grade")
    pairs = [] if judging else write_pairs(user)
    rf = body.get("response_format")
    verdict = grade_reply if task_of(user) == "grade" else judge_verdict  # Task: grade -> standins/smoke/grader.py
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
    pt, ct = _tokens(prompt_text), _tokens(content)
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
