"""Item pipelines: clean every paper record, then collect papers (deduplicated by DOI) and error records on the
crawler, where `stages.scrape.run` picks them up after the crawl."""

from __future__ import annotations

import logging
from typing import Any

from qrb.schema import ErrorItem, PaperItem

from .parse import norm

log = logging.getLogger(__name__)


class CleanPipeline:
    """Normalise whitespace in every string field and list entry; drop empty list entries and empty optionals."""

    def process_item(self, item: Any) -> Any:
        if isinstance(item, PaperItem):
            for name in ("doi", "url", "title", "abstract", "published", "volume", "page", "arxiv", "citation",
                         "license"):
                value = getattr(item, name)
                if value is not None:
                    setattr(item, name, norm(value) or None)
            item.authors = [a for a in (norm(x) for x in item.authors) if a]
            item.affiliations = [a for a in (norm(x) for x in item.affiliations) if a]
        return item


class Collector:
    """What the crawl produced: papers by DOI and error records."""

    def __init__(self) -> None:
        self.papers: dict[str, PaperItem] = {}
        self.errors: list[ErrorItem] = []
        self.duplicates = 0


class CollectPipeline:
    """Store items on the spider's `collector` (a `Collector`)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> "CollectPipeline":
        return cls(crawler)

    def process_item(self, item: Any) -> Any:
        spider = self.crawler.spider
        c = getattr(spider, "collector", None)
        if c is None:
            c = spider.collector = Collector()
        if isinstance(item, PaperItem):
            old = c.papers.get(item.doi)
            if old is not None:
                c.duplicates += 1
                # same paper reached at two URLs: keep one, deterministically
                if item.url >= old.url:
                    return item
            c.papers[item.doi] = item
        elif isinstance(item, ErrorItem):
            c.errors.append(item)
        return item
