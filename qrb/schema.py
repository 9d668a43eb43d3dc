"""The records the stages pass to each other, typed once: papers (scrape -> generate, validate, evaluate), crawl
errors, question/answer pairs (generate -> validate -> train, evaluate) and the questions evaluate scores.

A paper is keyed by its DOI everywhere (`doi`); so is a pair's paper. Question sets read from elsewhere (the golden
questions name theirs `paper_doi` / `paper_arxiv`) are normalised once, by `question_record`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

# The keys of every papers.jsonl record, in schema order (`full_text` is added when scrape.full_text is on).
PAPER_KEYS = ("doi", "url", "title", "authors", "affiliations", "published", "volume", "page", "arxiv",
              "citation", "abstract", "license")


@dataclasses.dataclass
class PaperItem:
    """One paper page (a scrapy item: scrapy handles dataclasses through itemadapter)."""

    doi: str
    url: str
    title: str
    abstract: str
    published: str  # YYYY-MM-DD
    authors: list[str] = dataclasses.field(default_factory=list)
    affiliations: list[str] = dataclasses.field(default_factory=list)
    volume: str | None = None
    page: str | None = None
    arxiv: str | None = None  # as shown, e.g. "arXiv:2002.07868v2"
    citation: str | None = None  # as shown, e.g. "Quantum 5, 574 (2021)."
    license: str | None = None  # SPDX-like id, e.g. "CC-BY-4.0"
    full_text: str | None = None  # only with the `full_text` param

    def record(self, with_full_text: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: d[k] for k in PAPER_KEYS + (("full_text",) if with_full_text else ())}


@dataclasses.dataclass
class ErrorItem:
    """A page the crawler could not turn into a paper (errors.jsonl)."""

    url: str
    reason: str  # machine key: http_404, timeout, missing_abstract, malformed_html, robots_disallowed, ...
    detail: str = ""
    kind: str = "paper"  # paper | listing | sitemap

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QAPair:
    """One generated question/answer pair with its provenance (train.jsonl / eval.jsonl rows, and seen.jsonl rows,
    which add `source_question`). A kept pair as first written is a *fact* (variant 0); knowledge augmentation adds
    its rewordings (variants 1..K-1, same fact_id), which no duplicate check may compare with each other."""

    question: str
    answer: str
    doi: str
    title: str
    published: str | None  # YYYY-MM-DD, or None when the paper has no date
    prompt_id: str
    model: str
    response_id: str
    chunk: int  # 0 = the abstract, n = the n-th chunk of the full text
    fact_id: str  # first 16 hex of sha256(doi + the fact's variant-0 question): shared by all its variants
    variant: int  # 0 = the pair as first written, 1..K-1 its rewordings
    short_answer: str = ""  # the key fact alone (a number with its unit, a name, a term): what grading looks for
    aliases: tuple[str, ...] = ()  # other ways to write the short answer ("3", "three")
    evidence: str = ""  # the paper's sentence that states the fact (grounding, citations)
    kind: str = "fact"  # fact | reverse ("which paper reports ...?": the title) | abstain (an invented paper) |
    # raft (the question asked as the apps ask it with retrieval: the question is the whole RAG message)

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "aliases": list(self.aliases)}


PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(QAPair))
# a row without the key-fact fields (written before they existed, or by hand) is still a pair: they default
REQUIRED_PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(QAPair) if f.default is dataclasses.MISSING)
PROVENANCE_FIELDS = ("prompt_id", "model", "response_id", "chunk")
PAIR_KINDS = ("fact", "reverse", "abstain", "raft")
# The one target of every abstention item (a question about a paper the bot has not read) and what graders count as
# "not attempted": fixed, so a model learns one polite refusal instead of imitating invented answers.
ABSTAIN_ANSWER = "I don't know that paper, so I can't answer that."
DOI_REGEX = r"^10\.\d{4,9}/[-._;()/:A-Za-z0-9<>]+$"
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def pair_field_ok(field: str, value: Any) -> bool:
    """Whether `value` has the type the schema gives `field` (a JSON file may hold anything)."""
    if field in ("variant", "chunk"):
        return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (
            field == "chunk" and isinstance(value, str))
    if field == "aliases":
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    if field == "kind":
        return value in PAIR_KINDS
    if field == "published":  # a paper may have no date; when it has one it is YYYY-MM-DD
        return value is None or (isinstance(value, str) and bool(_DATE.match(value)))
    return isinstance(value, str)


def question_record(row: dict[str, Any]) -> dict[str, Any]:
    """A question evaluate scores, whatever file it came from: `doi` and `arxiv` name its paper (the golden
    questions' `paper_doi` / `paper_arxiv` are the same fields)."""
    out = dict(row)
    for old, new in (("paper_doi", "doi"), ("paper_arxiv", "arxiv")):
        if old in out:
            value = out.pop(old)
            if out.get(new) is None:
                out[new] = value
    return out
