"""The chat-completions wire format of the smoke endpoint: a request body -> a `chat.completion` object (pure; the
same body gives the same reply, `created` aside). Every reply is labelled: model id `qrb-smoke-extractive` and a
`system_fingerprint` saying that it is a smoke-test endpoint.

`response_format` with a JSON schema is honoured (the content is JSON matching the schema); without it the JSON
comes inside a Markdown code fence after a line of prose, as some endpoints do, to exercise tolerant parsers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any

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


def completion(body: dict[str, Any], fault: str | None = None) -> dict[str, Any]:
    """A chat.completion object for a request body (deterministic in the body)."""
    messages = body.get("messages") or []
    user = "\n".join(str(m.get("content", "")) for m in messages if m.get("role") == "user")
    prompt_text = "\n".join(str(m.get("content", "")) for m in messages)
    req = parse_user_message(user)
    pairs = extractive_pairs(req["title"], req["abstract"], req["focus"], req["n"])
    rf = body.get("response_format")
    payload = json.dumps({_array_key(rf): pairs}, ensure_ascii=False)
    if isinstance(rf, dict) and rf.get("type") in ("json_schema", "json_object"):
        content = payload
    else:
        content = f"Here are the question-answer pairs:\n```json\n{payload}\n```"
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
