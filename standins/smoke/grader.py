"""`Task: grade` (prompts/grade.txt): the smoke endpoint's grade of one answer, by the offline short-answer grader of
the evaluate stage (deterministic), in the LLM grader's reply shape {"grade": "CORRECT" | "INCORRECT" |
"NOT_ATTEMPTED"}."""

from __future__ import annotations

import re

from qrb.grade import grade


def _block(text: str, tag: str) -> str:
    found = re.findall(rf"<{tag}>\n?(.*?)\n?</{tag}>", text, re.S)
    return found[-1].strip() if found else ""  # the last: the prompt's own examples come before the data


def grade_reply(user: str) -> dict[str, str]:
    aliases = [a for a in _block(user, "also_accepted").splitlines() if a.strip() and a.strip() != "(none)"]
    g = grade(_block(user, "predicted_answer"), _block(user, "gold_target"), aliases, _block(user, "question"))
    return {"grade": g.upper()}
