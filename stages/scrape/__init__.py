"""Scrape stage: a polite, incremental scrapy crawl of quantum-journal.org -> paper records.

Run from the repository (or workspace) root:  python -m stages.scrape

Reads:  params.yaml `scrape:` (start URLs, date window, discovery bounds, politeness, page cap, full_text);
        cache/scrape/records.jsonl (the seen-set: full records of papers fetched by earlier crawls);
        cache/scrape/http/ (scrapy's HTTP cache of earlier responses).
Writes: artifacts/scrape/papers.jsonl  one record per paper in [date_from, date_to], sorted by DOI, deduplicated
                                       (keys: doi url title authors affiliations published volume page arxiv
                                       citation abstract license [+ full_text when the param is on]);
        artifacts/scrape/errors.jsonl  one {url, reason, detail, kind} per page that failed or lacked a field;
        reports/scrape.json            pages fetched, papers kept/new/cached, skipped by date, errors by reason,
                                       HTTP-cache hits and revalidations, the Crawl-delay obeyed, caps hit;
        metrics/scrape.json            its headline numbers (papers kept/new, pages, requests, errors);
        cache/scrape/                  (persist: true in dvc.yaml) records.jsonl, every paper record fetched so far,
                                       and http/, the HTTP cache.

Discovery needs no list of the site's listing paths: from the start URLs the crawl follows in-site links (bounded by
`max_depth` hops through pages that link to no paper, and `max_discovery_pages`), plus the sitemap robots.txt names,
to paper pages `/papers/q-YYYY-MM-DD-N/` (or any page whose meta tags say it is a paper); see `stages.scrape.spider`.
The date in a paper URL (= the DOI) lets the crawl skip papers outside the window, and papers already in the
seen-set, without fetching them; DVC deletes papers.jsonl before each run, so the output is rebuilt from the cached
records plus the newly fetched ones. robots.txt is obeyed, its Crawl-delay included; pages come from the HTTP cache
while the site's Cache-Control allows it and are revalidated (ETag / Last-Modified) after.

Fails, writing nothing and leaving the seen-set as it was: exit 75 when no start URL or sitemap could be fetched;
exit 65 when the site answered but no paper in the window was kept (a layout the discovery did not reach, a page
cap too low, a window without papers).

This module stays light (no scrapy import): the crawl lives in `stages.scrape.run` / `.spider`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from urllib.parse import urlsplit

SECTION = "scrape"
BASE_KEYS: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ScrapeParams:
    start_urls: tuple[str, ...]
    date_from: _dt.date
    date_to: _dt.date
    max_pages: int  # hard cap on HTTP requests per crawl (HTTP-cache hits excluded)
    max_depth: int  # link hops followed through pages that link to no paper page (see stages.scrape.spider)
    max_discovery_pages: int  # cap on non-paper pages fetched by following links (start URLs excluded)
    user_agent: str
    obey_robots: bool
    concurrent_requests_per_domain: int
    download_delay_s: float
    autothrottle: bool
    autothrottle_start_delay_s: float
    autothrottle_max_delay_s: float
    retry_times: int  # on 5xx / time-outs, with exponential backoff
    timeout_s: float
    full_text: bool  # also fetch each paper's arXiv HTML text (record key `full_text`)
    full_text_url: str  # template with {arxiv_id}: where the full text is fetched from (its host is allowed)

    def check(self) -> None:
        if not self.start_urls:
            raise ValueError("params: `scrape.start_urls` must name at least one URL")
        for u in self.start_urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"params: `scrape.start_urls` entries must be http(s) URLs, got {u!r}")
        if self.date_from > self.date_to:
            raise ValueError(f"params: `scrape.date_from` ({self.date_from}) is after `scrape.date_to` "
                             f"({self.date_to})")
        for key in ("max_pages", "concurrent_requests_per_domain"):
            if getattr(self, key) < 1:
                raise ValueError(f"params: `scrape.{key}` must be at least 1, got {getattr(self, key)}")
        for key in ("max_depth", "max_discovery_pages", "retry_times", "download_delay_s",
                    "autothrottle_start_delay_s", "autothrottle_max_delay_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"params: `scrape.{key}` must be 0 or more, got {getattr(self, key)}")
        if self.timeout_s <= 0:
            raise ValueError(f"params: `scrape.timeout_s` must be positive, got {self.timeout_s}")
        if "{arxiv_id}" not in self.full_text_url or urlsplit(self.full_text_url).scheme not in ("http", "https"):
            raise ValueError("params: `scrape.full_text_url` must be an http(s) URL template containing "
                             f"{{arxiv_id}}, got {self.full_text_url!r}")
        if not self.user_agent.strip():
            raise ValueError("params: `scrape.user_agent` must name the project and a contact")


PARAMS_CLASS = ScrapeParams

