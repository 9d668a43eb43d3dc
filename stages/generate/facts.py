"""Knowledge augmentation and "seen papers, new questions", pure: the fact-level requests (one `augment` request per
training fact, one `paraphrase` request per sampled fact), and what their replies become (the variants of a fact;
the reworded questions that pass the word-set Jaccard check against every training question)."""

from __future__ import annotations

import collections
import hashlib
import random
import re
from typing import Any

from qrb.schema import ABSTAIN_ANSWER, QAPair
from qrb.words import STOPWORDS, near_any, norm_words, word_set

from . import AUGMENT, INVENT, PARAPHRASE, GenerateParams
from .replies import parse_pairs
from .units import Unit, block_head, clean, make_unit

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def fact_id(doi: str, question: str) -> str:
    """A fact's id: the first 16 hex of sha256(doi + its variant-0 question)."""
    return hashlib.sha256((doi + question).encode("utf-8")).hexdigest()[:16]


def fact_block(fact: dict[str, Any], asked: list[str] | None = None) -> str:
    """The pair a fact-level request carries, delimited as untrusted data like a paper. `asked`: the paraphrase
    request's questions already asked of the fact (else the augment request's one question)."""
    lines = block_head(fact["title"], fact["doi"], fact.get("published"))
    if asked is None:
        lines.append(f"Question: {clean(fact['question'])}")
    lines.append(f"Answer: {clean(fact['answer'])}")
    if fact.get("short_answer"):
        lines.append(f"Short answer: {clean(fact['short_answer'])}")
        lines += [f"Alias: {clean(a)}" for a in fact.get("aliases") or ()]
    if fact.get("evidence"):
        lines.append(f"Evidence: {clean(fact['evidence'])}")
    lines += [f"Asked: {clean(q)}" for q in asked or ()]
    lines.append("</paper>")
    return "\n".join(lines)


def augment_units(facts: list[dict[str, Any]], template: str, system: str, p: GenerateParams,
                  seed: int) -> list[Unit]:
    """One request per fact for its K-1 rewordings (none when `augment_variants` is 1)."""
    if p.augment_variants <= 1:
        return []
    return [make_unit(f, AUGMENT, "{{pair}}", fact_block(f), template, system, p, seed, p.augment_variants - 1)
            for f in facts]


def reply_row(fact: dict[str, Any], value: dict[str, Any], prompt_id: str, **fields: Any) -> dict[str, Any]:
    """A row of `fact` (a QAPair record) from the reply `value` to a fact-level request: the fact's fields, but
    `fields`."""
    return {**fact, "prompt_id": prompt_id, "model": value["model"], "response_id": value["response_id"], **fields}


def variants_of(fact: dict[str, Any], value: dict[str, Any], p: GenerateParams) -> tuple[list[dict[str, Any]],
                                                                                          collections.Counter]:
    """The fact's variants 1..K-1 from its augment reply: a wording already used for the fact is skipped, and so is
    a variant whose answer lost a number of the fact's answer (a rewording must keep the facts)."""
    counts: collections.Counter = collections.Counter()
    used = {" ".join(norm_words(fact["question"]))}
    numbers = set(_NUMBER.findall(fact["answer"]))
    title = " ".join(norm_words(fact["title"]))
    out: list[dict[str, Any]] = []
    for pair in parse_pairs(value["content"]):
        if len(out) >= p.augment_variants - 1:
            break
        norm = " ".join(norm_words(pair["question"]))
        reverse = bool(title) and " ".join(norm_words(pair.get("short_answer", ""))) == title
        if norm in used:
            counts["variants_repeated"] += 1
            continue
        if not reverse and not numbers <= set(_NUMBER.findall(pair["answer"])):
            counts["variants_lost_facts"] += 1
            continue
        used.add(norm)
        counts["variants_reverse"] += reverse
        out.append(reply_row(fact, value, AUGMENT, question=pair["question"], answer=pair["answer"],
                             variant=len(out) + 1,
                             **({"short_answer": fact["title"], "aliases": [], "kind": "reverse"} if reverse else {})))
    return out, counts


def seen_sample(train_facts: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to `n` training facts, seeded: the train papers in a shuffled order, one fact of each in turn (so the set
    spans as many papers as it can), in the facts' own order within a paper."""
    by_paper: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for f in train_facts:
        by_paper[f["doi"]].append(f)
    papers = sorted(by_paper)
    random.Random(f"seen:{seed}").shuffle(papers)
    out: list[dict[str, Any]] = []
    depth = 0
    while len(out) < n and any(len(by_paper[d]) > depth for d in papers):
        out += [by_paper[d][depth] for d in papers if len(by_paper[d]) > depth][:n - len(out)]
        depth += 1
    return out


def paraphrase_units(sample: list[dict[str, Any]], train: list[dict[str, Any]], template: str, system: str,
                     p: GenerateParams, seed: int) -> list[Unit]:
    """One request per sampled fact for a new question; it lists every training question of the fact."""
    asked: dict[str, list[str]] = collections.defaultdict(list)
    for r in train:
        asked[r["fact_id"]].append(r["question"])
    return [make_unit(f, PARAPHRASE, "{{pair}}", fact_block(f, asked[f["fact_id"]] or [f["question"]]), template,
                      system, p, seed, 1) for f in sample]


def seen_rows(units: list[Unit], responses: dict[str, dict[str, Any]], facts: dict[str, dict[str, Any]],
              train: list[dict[str, Any]], max_jaccard: float) -> tuple[list[dict[str, Any]], int]:
    """The kept reworded questions (seen.jsonl rows) and how many were dropped: a question is kept only if its
    word-set Jaccard with every training question (all facts, all variants) is below `max_jaccard`."""
    train_sets = [word_set(r["question"]) for r in train]
    kept: list[dict[str, Any]] = []
    dropped = 0
    for unit in units:
        value = responses.get(unit.key)
        if value is None:
            continue
        pairs = parse_pairs(value["content"])
        fact = facts[unit.fact_id]
        question = pairs[0]["question"] if pairs else ""
        if near_any(word_set(question), train_sets, max_jaccard):
            dropped += 1
            continue
        kept.append(reply_row(fact, value, PARAPHRASE, question=question, source_question=fact["question"]))
    return kept, dropped


INVENT_PER_REQUEST = 10  # invented papers asked for per `invent` request
INVENT_LISTED = 12  # real papers an `invent` request lists: enough variety to write like, ~2k prompt tokens
INVENT_ABSTRACT_CHARS = 600  # of each listed abstract: its opening claims, which is what the questions ask about


def with_spare(n_abstain: int) -> int:
    """Invented papers to ask for to keep `n_abstain` abstention rows: an invented title too close to a real one,
    or a repeated question, is dropped."""
    return n_abstain + (n_abstain // 2 + 5 if n_abstain else 0)


def _opening(abstract: str) -> str:
    """The abstract's whole sentences within INVENT_ABSTRACT_CHARS (its first words if one sentence is longer)."""
    if len(abstract) <= INVENT_ABSTRACT_CHARS:
        return abstract
    cut = abstract[:INVENT_ABSTRACT_CHARS]
    return cut[:cut.rfind(". ") + 1] if ". " in cut else cut.rsplit(" ", 1)[0]


def invent_units(papers: list[dict[str, Any]], n_eval: int, n_train: int, template: str, system: str,
                 p: GenerateParams, seed: int) -> list[Unit]:
    """Requests for questions about invented papers, INVENT_PER_REQUEST a request: `n_eval` for the invented question
    set, then `n_train` for abstention rows (apart, so that the set is the same whatever the share of abstention
    rows); each lists a seeded sample of real papers (title, the start of the abstract) to stay unlike and to write
    like. `papers`: the training papers only, so that no held-out paper's words teach the abstention answer."""
    listed = sorted((clean(pp["title"]), _opening(clean(pp.get("abstract") or ""))) for pp in papers if pp.get("title"))
    units = []
    for group, n in (("eval", n_eval), ("train", n_train)):
        for i in range(0, n, INVENT_PER_REQUEST):
            sample = random.Random(f"invent:{seed}:{group}:{i}").sample(listed, min(INVENT_LISTED, len(listed)))
            block = "\n".join(["<paper>", f"Request: {group} {i // INVENT_PER_REQUEST}",
                               *(line for t, a in sample for line in (f"Title: {t}", f"Abstract: {a}")),
                               "</paper>"])
            fact = {"doi": "", "title": "", "published": None, "chunk": 0,
                    "fact_id": f"invent-{group}-{i // INVENT_PER_REQUEST}"}
            units.append(make_unit(fact, INVENT, "{{pair}}", block, template, system, p, seed,
                                   min(INVENT_PER_REQUEST, n - i)))
    return units


def names_paper(question: str, title: str) -> bool:
    """Does the question name the paper: at least half of its title's words (stop words aside) in it?"""
    title_words = {w for w in norm_words(title) if w not in STOPWORDS}
    return bool(title_words) and 2 * len(title_words & set(norm_words(question))) >= len(title_words)


def invented_rows(units: list[Unit], responses: dict[str, dict[str, Any]], real_titles: list[str], n_train: int,
                  max_jaccard: float, real_questions: list[str], question_jaccard: float
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """The invented papers' questions: the `invent-eval-*` requests' make the `invented` question set, the
    `invent-train-*` requests' (up to `n_train`) train the abstention answer, never about a paper the set asks
    about. Dropped: a question whose invented title is (nearly) a real paper's title; one that repeats an earlier
    one; one that does not name its invented paper (`names_paper`) and is worded as a real training
    question (word-set Jaccard >= `question_jaccard`): that asks a real paper's fact, and "I don't know" is wrong
    for it. Returns (train rows, invented set rows, dropped)."""
    real = [word_set(t) for t in real_titles]
    asked = [word_set(q) for q in real_questions]
    rows: dict[str, list[dict[str, Any]]] = {"eval": [], "train": []}
    seen, dropped = set(), 0
    for unit in units:
        value = responses.get(unit.key)
        group = "eval" if unit.fact_id.startswith("invent-eval") else "train"
        for pair in parse_pairs(value["content"]) if value else ():
            title = pair.get("short_answer") or pair["answer"]
            norm = " ".join(norm_words(pair["question"]))
            if norm in seen or near_any(word_set(title), real, max_jaccard) or (
                    not names_paper(pair["question"], title)
                    and near_any(word_set(pair["question"]), asked, question_jaccard)):
                dropped += 1
                continue
            seen.add(norm)
            rows[group].append(QAPair(question=pair["question"], answer=ABSTAIN_ANSWER, doi="", title=title,
                                      published=None, prompt_id=INVENT, model=value["model"],
                                      response_id=value["response_id"], chunk=0,
                                      fact_id=fact_id("", pair["question"]), variant=0, kind="abstain").record())
    held_titles = {r["title"].lower() for r in rows["eval"]}
    train = [r for r in rows["train"] if r["title"].lower() not in held_titles]
    dropped += len(rows["train"]) - len(train)
    return train[:n_train], rows["eval"], dropped
