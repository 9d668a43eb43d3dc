"""The quantum-journal.org spider: URL-pattern discovery (CrawlSpider rules + the robots.txt sitemap), date-window
and seen-set filtering before any paper page is fetched, one item per paper page (a `PaperItem` or an `ErrorItem`)."""

from __future__ import annotations

import gzip
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

from scrapy import Request
from scrapy.exceptions import IgnoreRequest
from scrapy.http import HtmlResponse, Response, TextResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.spiders import CrawlSpider, Rule
from scrapy.utils.sitemap import Sitemap
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.python.failure import Failure

from qrb.schema import ErrorItem, PaperItem

from . import ScrapeParams
from .parse import PAPER_PATH_RE, paper_id_from_url, parse_full_text_html, parse_paper_html
from .pipelines import Collector

log = logging.getLogger(__name__)

PAPER_URL_PATTERN = r"/papers/q-\d{4}-\d{2}-\d{2}-\d+/?$"
LISTING_URL_PATTERNS = (r"/papers/?$", r"/papers/page/\d+/?$", r"/volumes?/\d+/?$", r"/volumes?/\d+/page/\d+/?$")
ARXIV_HTML_URL = "https://arxiv.org/html/{arxiv_id}"


def failure_reason(failure: Failure) -> tuple[str, str]:
    """(reason key, detail) for a failed request."""
    exc = failure.value
    request = getattr(failure, "request", None)
    if isinstance(exc, HttpError):
        return f"http_{exc.response.status}", f"HTTP {exc.response.status}"
    if isinstance(exc, IgnoreRequest):
        msg = str(exc)
        if msg.startswith("Offsite redirect"):
            return "offsite_redirect", msg
        if msg.startswith("Page cap reached"):
            return "page_cap", msg
        if "robots.txt" in msg:
            return "robots_disallowed", msg
        if "offsite" in msg.lower():
            redirected = bool(request is not None and request.meta.get("redirect_urls"))
            return ("offsite_redirect" if redirected else "offsite"), f"{msg} ({request.url if request else ''})"
        return "ignored", msg
    name = type(exc).__name__  # scrapy >= 2.14 wraps Twisted's errors in its own Download*Error classes
    if isinstance(exc, (TxTimeoutError, TCPTimedOutError)) or "Timeout" in name or name == "TimeoutError":
        return "timeout", f"{name}: {exc}"
    if isinstance(exc, DNSLookupError) or name == "CannotResolveHostError":
        return "dns_error", f"{name}: {exc}"
    if isinstance(exc, ConnectionRefusedError) or name == "DownloadConnectionRefusedError":
        return "connection_refused", f"{name}: {exc}"
    if name == "ResponseDataLossError":
        return "data_loss", f"{name}: {exc}"
    return "download_error", f"{type(exc).__name__}: {exc}"


def _original_url(request: Request) -> str:
    return (request.meta.get("redirect_urls") or [request.url])[0]


class QuantumSpider(CrawlSpider):
    name = "quantum-journal"

    def __init__(self, params: ScrapeParams, seen: Iterable[str] = (), full_text_url: str = ARXIV_HTML_URL,
                 **kwargs: Any) -> None:
        self.params = params
        self.start_urls = list(params.start_urls)
        self.site_hosts = sorted({urlsplit(u).hostname for u in params.start_urls if urlsplit(u).hostname})
        self.full_text_url = full_text_url
        extra = [urlsplit(full_text_url.format(arxiv_id="x")).hostname] if params.full_text else []
        self.allowed_domains = sorted(set(self.site_hosts) | {h for h in extra if h})
        self.seen = set(seen)  # DOIs already fetched by an earlier crawl (full records in the cache)
        self.stats_local: Counter[str] = Counter()
        self.collector = Collector()
        self._counted: set[str] = set()
        self.rules = (
            # (LinkExtractor's allow_domains compares host:port, so in-site filtering is done in onsite_links)
            Rule(LinkExtractor(allow=PAPER_URL_PATTERN), callback="parse_paper", follow=False,
                 process_links="onsite_links", process_request="filter_paper", errback="paper_failed"),
            Rule(LinkExtractor(allow=LISTING_URL_PATTERNS), callback="parse_listing", follow=True,
                 process_links="onsite_links",
                 process_request="mark_listing", errback="listing_failed"),
        )
        super().__init__(**kwargs)

    # -- start: the start URLs (listing pages) and each site's robots.txt (for its Sitemap: lines) -------------
    async def start(self) -> AsyncIterator[Any]:
        origins = []
        for url in self.start_urls:
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
            if origin not in origins:
                origins.append(origin)
            if paper_id_from_url(url):
                req = self.filter_paper(Request(url, callback=self.parse_paper, errback=self.paper_failed), None)
                if req is not None:
                    yield req
            else:
                yield Request(url, callback=self._parse, errback=self.listing_failed, meta={"qrb_kind": "listing"})
        if not self.params.obey_robots:  # else the robots.txt that RobotsTxtMiddleware fetches is read once
            for origin in origins:       # parsed (on_robots_parsed): no second request
                yield Request(f"{origin}/robots.txt", callback=self.parse_robots, errback=self.quiet_failure,
                              meta={"qrb_kind": "robots", "dont_obey_robotstxt": True}, priority=-1)

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> "QuantumSpider":
        from scrapy import signals

        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_robots_parsed, signal=signals.robots_parsed)
        return spider

    def on_robots_parsed(self, robotparser: Any, request: Request) -> None:
        """Follow the Sitemap: lines of a robots.txt that RobotsTxtMiddleware parsed."""
        sitemaps = getattr(getattr(robotparser, "rp", None), "sitemaps", None)
        if sitemaps is None:  # another ROBOTSTXT_PARSER: fetch robots.txt ourselves
            parts = urlsplit(request.url)
            reqs = [Request(f"{parts.scheme}://{parts.netloc}/robots.txt", callback=self.parse_robots,
                            errback=self.quiet_failure, meta={"qrb_kind": "robots"}, priority=-1)]
        else:
            reqs = list(self._sitemap_requests(request.url, list(sitemaps)))
        for req in reqs:
            self.crawler.engine.crawl(req)

    def _sitemap_requests(self, base_url: str, urls: list[str]) -> Iterable[Request]:
        for u in urls:
            url = urljoin(base_url, u.strip())
            if urlsplit(url).hostname in self.site_hosts:
                yield Request(url, callback=self.parse_sitemap, errback=self.listing_failed,
                              meta={"qrb_kind": "sitemap"})

    # -- discovery ----------------------------------------------------------------------------------------------
    def onsite_links(self, links: list[Any]) -> list[Any]:
        return [lk for lk in links if urlsplit(lk.url).hostname in self.site_hosts]

    def mark_listing(self, request: Request, response: Response | None) -> Request:
        request.meta["qrb_kind"] = "listing"
        return request

    def filter_paper(self, request: Request, response: Response | None) -> Request | None:
        """Drop paper requests outside the date window or already seen, before anything is fetched."""
        pid = paper_id_from_url(request.url)
        if pid is None:
            return None
        pid_str, day = pid
        doi = f"10.22331/{pid_str}"
        first = doi not in self._counted
        self._counted.add(doi)
        if not (self.params.date_from <= day <= self.params.date_to):
            if first:
                self.stats_local["skipped_by_date"] += 1
            return None
        if doi in self.seen:
            if first:
                self.stats_local["skipped_seen"] += 1
            return None
        # canonical form: scheme://host/papers/<id>/ (no query, fragment or missing slash)
        parts = urlsplit(request.url)
        canon = f"{parts.scheme}://{parts.netloc}{PAPER_PATH_RE.sub('', parts.path)}/papers/{pid_str}/"
        request.meta["qrb_kind"] = "paper"
        return request.replace(url=canon) if canon != request.url else request

    def parse_robots(self, response: Response) -> Iterable[Request]:
        text = response.text if isinstance(response, TextResponse) else response.body.decode("utf-8", "replace")
        found = [m.group(1) for line in text.splitlines() if (m := re.match(r"^\s*sitemap\s*:\s*(\S+)", line, re.I))]
        yield from self._sitemap_requests(response.url, found)

    def parse_sitemap(self, response: Response) -> Iterable[Any]:
        self.stats_local["sitemaps_fetched"] += 1
        body = response.body
        if body[:2] == b"\x1f\x8b":
            try:
                body = gzip.decompress(body)
            except OSError:
                yield ErrorItem(url=response.url, reason="malformed_sitemap", detail="bad gzip", kind="sitemap")
                return
        try:
            sm = Sitemap(body)
            locs = [d["loc"] for d in sm if d.get("loc")]
        except Exception as exc:  # noqa: BLE001 - lxml/xml errors of a broken sitemap
            yield ErrorItem(url=response.url, reason="malformed_sitemap", detail=str(exc)[:200], kind="sitemap")
            return
        for loc in locs:
            url = urljoin(response.url, loc.strip())
            if urlsplit(url).hostname not in self.site_hosts:
                continue
            if sm.type == "sitemapindex":
                yield Request(url, callback=self.parse_sitemap, errback=self.listing_failed,
                              meta={"qrb_kind": "sitemap"})
            elif re.search(PAPER_URL_PATTERN, urlsplit(url).path):
                req = self.filter_paper(Request(url, callback=self.parse_paper, errback=self.paper_failed), None)
                if req is not None:
                    yield req
            elif any(re.search(p, urlsplit(url).path) for p in LISTING_URL_PATTERNS):
                yield Request(url, callback=self._parse, errback=self.listing_failed, meta={"qrb_kind": "listing"})

    def parse_listing(self, response: Response, **kwargs: Any) -> Iterable[Any]:
        """A listing page: nothing to extract, the rules follow its links."""
        self.stats_local["listing_pages_fetched"] += 1
        return ()

    parse_start_url = parse_listing  # start URLs and sitemap-listed listings (CrawlSpider._parse)

    # -- paper pages ----------------------------------------------------------------------------------------------
    def parse_paper(self, response: Response) -> Iterable[Any]:
        self.stats_local["paper_pages_fetched"] += 1
        url = _original_url(response.request) if response.request is not None else response.url
        if not isinstance(response, HtmlResponse):
            ctype = response.headers.get(b"Content-Type", b"").decode("latin-1")
            yield ErrorItem(url=url, reason="not_html", detail=f"Content-Type {ctype!r}")
            return
        try:
            item = parse_paper_html(response.text, response.url)
        except Exception as exc:  # noqa: BLE001 - a parser bug must not drop the page silently
            log.exception("scrape: parsing %s failed", response.url)
            yield ErrorItem(url=url, reason="parse_exception", detail=f"{type(exc).__name__}: {exc}")
            return
        if isinstance(item, ErrorItem):
            item.url = url
            yield item
            return
        if self.params.full_text and item.arxiv:
            arxiv_id = item.arxiv.removeprefix("arXiv:")
            yield Request(self.full_text_url.format(arxiv_id=arxiv_id), callback=self.parse_full_text,
                          errback=self.full_text_failed, cb_kwargs={"item": item}, meta={"qrb_kind": "full_text"})
            return
        yield item

    def parse_full_text(self, response: Response, item: PaperItem) -> Iterable[Any]:
        self.stats_local["full_text_fetched"] += 1
        if isinstance(response, TextResponse):
            item.full_text = parse_full_text_html(response.text)
        yield item

    def full_text_failed(self, failure: Failure) -> Iterable[Any]:
        reason, detail = failure_reason(failure)
        self.stats_local["full_text_failed"] += 1
        log.warning("scrape: full text not fetched (%s): %s", reason, failure.request.url)
        item = failure.request.cb_kwargs["item"]
        yield item  # the paper record stands without its full text

    # -- failures -------------------------------------------------------------------------------------------------
    def paper_failed(self, failure: Failure) -> Iterable[Any]:
        reason, detail = failure_reason(failure)
        yield ErrorItem(url=_original_url(failure.request), reason=reason, detail=detail, kind="paper")

    def listing_failed(self, failure: Failure) -> Iterable[Any]:
        reason, detail = failure_reason(failure)
        kind = failure.request.meta.get("qrb_kind", "listing")
        yield ErrorItem(url=_original_url(failure.request), reason=reason, detail=detail, kind=kind)

    def quiet_failure(self, failure: Failure) -> None:
        log.info("scrape: %s not fetched (%s)", failure.request.url, failure_reason(failure)[0])
