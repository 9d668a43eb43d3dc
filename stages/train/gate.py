"""The confidence gate: the adapter declines what it is unsure of, at a threshold calibrated on questions it did not
train on, and a question that quotes the title of a paper it was not trained on. Before training, one wording of each
fact that has several is held back (a known fact in words it has not seen, as users ask) and so are the abstention
rows of every HOLD_ABSTAIN_EVERY-th unknown paper (invented or only read). After training the model answers both; the
threshold on its answer's least likely token (`qrb.model.token_confidence`) is the lowest at which DECLINE_UNKNOWN of
the unknown papers' questions are declined; the known facts kept right are reported. `qrb.model.Gate` applies both
rules wherever the adapter answers closed-book (evaluate, the apps)."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

DECLINE_UNKNOWN = 0.85  # a rate, not a score against known rows (surer than users' questions); a margin over 70%
HOLD_ABSTAIN_EVERY = 4  # a quarter of the unknown papers: enough to calibrate on, most still train
MAX_NEW_TOKENS = 32  # a short answer and the abstention answer fit
TRAINED = ("fact", "reverse")  # the row kinds that teach a paper closed-book (its title known to the gate)


def hold_back(rows: list[dict[str, Any]], seed: int) -> tuple[list[int], list[int], list[int]]:
    """(indices to train on, known facts held back, unknown papers held back): one wording (not the first) of each
    fact with at least 3 wordings, chosen by a seeded hash; the abstention rows of every HOLD_ABSTAIN_EVERY-th paper
    (invented or only read), in the order they first appear."""
    def rank(i: int) -> str:
        return hashlib.sha256(f"{seed}\x00{rows[i]['question']}".encode()).hexdigest()

    wordings: dict[str, list[int]] = defaultdict(list)
    papers: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.get("kind") == "fact" and r.get("variant"):
            wordings[r["fact_id"]].append(i)
        elif r.get("kind") == "abstain":
            papers[r.get("doi") or r.get("title") or r["question"]].append(i)
    known = sorted(min(ix, key=rank) for ix in wordings.values() if len(ix) >= 2)
    # whole papers: a held-back wording whose siblings train is declined by rote, not for being unfamiliar
    unknown = sorted(i for ix in list(papers.values())[::HOLD_ABSTAIN_EVERY] for i in ix)
    held = set(known) | set(unknown)
    return [i for i in range(len(rows)) if i not in held], known, unknown


def threshold(unknown: list[tuple[float, bool]]) -> float:
    """The lowest min_prob at which DECLINE_UNKNOWN of `unknown` ((confidence, declined anyway) per held-back row
    about an unknown paper) are declined."""
    answered = sorted(c for c, declined in unknown if not declined)
    allowed = int((1 - DECLINE_UNKNOWN) * len(unknown))  # answered rows the threshold may leave standing
    return 0.0 if len(answered) <= allowed else round(answered[len(answered) - allowed - 1] + 1e-6, 6)


def calibrate(model, tokenizer, rows: list[dict[str, Any]], known: list[int], unknown: list[int], system: str,
              batch_size: int, out_dir: Path) -> dict[str, Any]:
    """Answer the held-back rows, choose the threshold, write it and the titles trained on to `out_dir`/gate.json;
    returns what it found (the titles counted)."""
    from qrb.grade import NOT_ATTEMPTED, grade
    from qrb.model import GATE_FILE, Gate, generate_answers

    conf: list[float] = []
    held = [rows[i] for i in known + unknown]
    answers = generate_answers(model, tokenizer, [r["question"] for r in held], system, batch_size=batch_size,
                               max_new_tokens=MAX_NEW_TOKENS, confidences=conf, desc="gate")
    titles = Gate(0.0, tuple(sorted({r["title"] for r in rows if r.get("kind") in TRAINED and r.get("title")})))
    answers = [titles(r["question"], a, c) for r, a, c in zip(held, answers, conf)]  # the title rule alone
    k = len(known)
    graded = [(c, grade(a, r.get("short_answer") or "", r.get("aliases") or [], r["question"]))
              for c, a, r in zip(conf[:k], answers[:k], held[:k])]
    invented = [(c, grade(a, "", [], r["question"]) == NOT_ATTEMPTED)
                for c, a, r in zip(conf[k:], answers[k:], held[k:])]
    min_prob = threshold(invented)
    out = {"min_prob": min_prob, "known": k, "unknown": len(unknown),
           "known_kept_right": sum(g == "correct" and c >= min_prob for c, g in graded),
           "unknown_declined": sum(d or c < min_prob for c, d in invented)}
    (out_dir / GATE_FILE).write_text(json.dumps({**out, "papers": list(titles.papers)}, indent=2) + "\n")
    return {**out, "papers": len(titles.papers)}
