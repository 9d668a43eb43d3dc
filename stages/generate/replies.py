"""What a reply should hold (`PAIR_SCHEMA`, sent as the JSON-schema `response_format`) and the tolerant parser for
what replies really hold: schema-following JSON, fenced JSON, prose around JSON, bare lists, other key names."""

from __future__ import annotations

import json
import re
from typing import Any

PAIR_SCHEMA = {
    "type": "object",
    "properties": {"pairs": {"type": "array", "items": {
        "type": "object",
        "properties": {"question": {"type": "string"}, "answer": {"type": "string"},
                       "short_answer": {"type": "string"}, "aliases": {"type": "array", "items": {"type": "string"}},
                       "evidence": {"type": "string"}},
        "required": ["question", "answer", "short_answer", "aliases", "evidence"], "additionalProperties": False}}},
    "required": ["pairs"], "additionalProperties": False,
}

_QKEYS = ("question", "q", "prompt", "query")
_AKEYS = ("answer", "a", "response", "completion")
_JSON_START = re.compile(r"[\[{]")


def _pairs_from(obj: Any) -> list[dict[str, str]]:
    if isinstance(obj, list):
        return [pair for item in obj for pair in _pairs_from(item)]
    if isinstance(obj, dict):
        low = {str(k).lower(): v for k, v in obj.items()}
        q = next((low[k] for k in _QKEYS if k in low), None)
        a = next((low[k] for k in _AKEYS if k in low), None)
        if isinstance(q, str) and isinstance(a, str):
            pair = {"question": q, "answer": a}
            if isinstance(low.get("short_answer"), str):
                pair["short_answer"] = " ".join(low["short_answer"].split())
            if isinstance(low.get("aliases"), list):
                pair["aliases"] = [" ".join(x.split()) for x in low["aliases"] if isinstance(x, str) and x.strip()]
            if isinstance(low.get("evidence"), str):
                pair["evidence"] = " ".join(low["evidence"].split())
            return [pair]
        return [pair for v in obj.values() if isinstance(v, (list, dict)) for pair in _pairs_from(v)]
    return []


def parse_pairs(content: str | None) -> list[dict[str, str]]:
    """Question/answer pairs in a reply, with their `short_answer`, `aliases` and `evidence` where the reply has
    them; [] when there are none (invalid JSON counts as none)."""
    if not content:
        return []
    text = content.strip()
    try:
        found = _pairs_from(json.loads(text))
    except ValueError:  # not one JSON document: every decodable JSON value in the text, left to right
        found = []
        decoder = json.JSONDecoder()
        pos = 0
        while m := _JSON_START.search(text, pos):
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
            out.append({**pair, "question": q, "answer": a})
    return out
