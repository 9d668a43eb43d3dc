"""The papers' own text as continued-pretraining rows beside the QA rows (`train.text`): each training paper's
abstract (+ full text when scraped) as written and in rule-based rewrites, cut into max_length token rows that carry
the loss on every token, mixed with the QA rows or staged before/after them. Papers are the training split's only."""

from __future__ import annotations

import random
import re

from qrb.errors import DataError

from . import TextParams

_PRONOUNS = {"we": "the authors", "our": "their", "us": "them", "ours": "theirs", "ourselves": "themselves"}
_PRONOUN_RE = re.compile(r"\b([Ww]e|[Oo]urs|[Oo]urselves|[Oo]ur|us)\b")  # "US" (a country) is left alone
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z$\\(\[])")


def third_person(sentence: str) -> str:
    """'We show our bound' -> 'The authors show their bound'."""
    def swap(m: re.Match) -> str:
        word = _PRONOUNS[m.group(0).lower()]
        return word[0].upper() + word[1:] if m.group(0)[0].isupper() else word

    return _PRONOUN_RE.sub(swap, sentence)


def versions(paper: dict, rewrites: int, seed: int) -> list[str]:
    """The paper's text as written (title, abstract, full text), then `rewrites` rule-based rewrites: sentences in
    a seeded shuffled order, "we"/"our" in the third person, the title before every sentence (odd rewrites) or once
    on top (even ones)."""
    title = paper["title"].strip()
    body = "\n\n".join(t.strip() for t in (paper.get("abstract"), paper.get("full_text")) if t and t.strip())
    out = [f"{title}\n\n{body}"]
    sentences = [third_person(s) for s in _SENTENCE_RE.split(" ".join(body.split())) if s]
    for k in range(1, rewrites + 1):
        order = sentences[:]
        random.Random(f"{seed}:{paper['doi']}:{k}").shuffle(order)
        out.append(" ".join(f"{title}: {s}" for s in order) if k % 2 else f"{title}\n\n" + " ".join(order))
    return out


def training_papers(papers, train_dois: set[str], eval_dois: set[str]) -> list[dict]:
    """The papers of the training split, never one an eval row asks about (held-out papers stay unseen)."""
    return [r for r in papers if r["doi"] in train_dois and r["doi"] not in eval_dois]


def text_rows(dataset, tokenizer, p: TextParams, n_qa: int, max_length: int, seed: int) -> list[dict]:
    """`p.share` of the training rows beside n_qa QA rows: every version of every training paper (the dataset's
    `papers` split), cut into near-equal rows of at most max_length tokens, drawn in a seeded order (the pool
    repeats when it is smaller than the count asked for), each with the loss on all its tokens."""
    if "papers" not in dataset:
        raise ValueError("`train.text.share` > 0 needs the papers' text (a `papers` split of the dataset)")
    eval_dois = set(dataset["eval"]["doi"]) if len(dataset.get("eval") or []) else set()
    pool = []
    for paper in training_papers(dataset["papers"], set(dataset["train"]["doi"]), eval_dois):
        for text in versions(paper, p.rewrites, seed):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            pieces = -(-len(ids) // max_length)  # the fewest rows of <= max_length tokens, of near-equal lengths
            size = -(-len(ids) // max(pieces, 1))
            pool += [ids[i:i + size] for i in range(0, len(ids) - 1, size)]
    if not pool:
        raise DataError("`train.text`: no training paper's text in artifacts/scrape/papers.jsonl (DOIs differ?)")
    n, rows, rng = round(n_qa * p.share / (1 - p.share)), [], random.Random(seed)
    while len(rows) < n:
        rows += rng.sample(pool, len(pool))
    return [{"input_ids": ids, "completion_mask": [1] * len(ids)} for ids in rows[:n]]


def order_rows(qa: list, text: list, p: TextParams, epochs: float, seed: int) -> list:
    """`mixed`: one list the trainer's sampler shuffles each epoch. Staged (`qa_first`, `text_first`): every epoch
    of one part, each reshuffled, then every epoch of the other, in a list the trainer reads once, in order."""
    if p.order == "mixed":
        return qa + text
    rng = random.Random(seed)

    def unrolled(rows: list) -> list:
        out: list = []
        while len(out) < round(epochs * len(rows)):
            out += rng.sample(rows, len(rows))
        return out[:round(epochs * len(rows))]

    first, second = (qa, text) if p.order == "qa_first" else (text, qa)
    return unrolled(first) + unrolled(second)
