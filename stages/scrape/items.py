"""Scrapy items of the scrape stage, as dataclasses (scrapy handles them through itemadapter)."""

from __future__ import annotations

import dataclasses
from typing import Any

# The keys of every papers.jsonl record, in schema order (the downstream contract; `full_text` is added when the
# `full_text` param is on).
PAPER_KEYS = ("doi", "url", "title", "authors", "affiliations", "published", "volume", "page", "arxiv",
              "citation", "abstract", "license")


@dataclasses.dataclass
class PaperItem:
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
        out = {k: d[k] for k in PAPER_KEYS}
        if with_full_text:
            out["full_text"] = d["full_text"]
        return out


@dataclasses.dataclass
class ErrorItem:
    url: str
    reason: str  # machine key: http_404, timeout, missing_abstract, malformed_html, robots_disallowed, ...
    detail: str = ""
    kind: str = "paper"  # paper | listing | sitemap

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
