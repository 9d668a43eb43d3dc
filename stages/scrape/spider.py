"""The quantum-journal.org spider: discovery by following in-site links and the robots.txt sitemap (the rules are
in `stages.scrape`'s docstring); date-window and seen-set filtering before any paper page is fetched; one item per
paper page (a `PaperItem` or an `ErrorItem`). Beside it: why a request failed (the reason key of its error record:
`http_404`, `timeout`, `robots_disallowed`, ...). The items stay on the spider (scrapy's `item_scraped` signal),
where `stages.scrape.run` picks them up after the crawl.
"""

from __future__ import annotations

import gzip
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

from scrapy import Request, Spider
from scrapy.exceptions import IgnoreRequest
from scrapy.http import HtmlResponse, Response, TextResponse
from scrapy.linkextractors import LinkExtractor
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.sitemap import Sitemap, sitemap_urls_from_robots
from twisted.internet.error import ConnectionRefusedError, DNSLookupError, TCPTimedOutError
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.python.failure import Failure
from w3lib.url import canonicalize_url

from qrb.schema import ErrorItem, PaperItem

from . import ScrapeParams
from .parse import PAPER_PATH_RE, paper_id_from_url, parse_full_text_html, parse_paper_html

log = logging.getLogger(__name__)

# never worth a request while looking for paper pages (LinkExtractor's default deny_extensions covers files with a
# suffix: .pdf, images, archives)
DENY_LINKS = (r"/pdf/?$", r"/feed/?$", r"/wp-admin/", r"/wp-login\.php", r"/xmlrpc\.php")
PAPER_PRIORITY = 1  # scrapy's default is 0: listing and other pages


# failures of a followed (non-paper) link that say only "nothing here": counted, not recorded as errors
QUIET_LINK_FAILURES = ("http_404", "http_410", "robots_disallowed", "offsite", "offsite_redirect")
# reason of a download error: by Twisted's classes, or by (part of) the class name, as scrapy >= 2.14 wraps Twisted's
# errors in its own Download*Error classes
DOWNLOAD_ERRORS = (("timeout", (TxTimeoutError, TCPTimedOutError), "Timeout"),
                   ("dns_error", DNSLookupError, "CannotResolveHostError"),
                   ("connection_refused", ConnectionRefusedError, "DownloadConnectionRefusedError"),
                   ("data_loss", (), "ResponseDataLossError"))


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
    name = type(exc).__name__
    reason = next((r for r, classes, part in DOWNLOAD_ERRORS if isinstance(exc, classes) or part in name),
                  "download_error")
    return reason, f"{name}: {exc}"


def original_url(request: Request) -> str:
    return (request.meta.get("redirect_urls") or [request.url])[0]


def section(url: str) -> str:
    """The first path segment ("" at the site's root): a listing's own pages share it."""
    return next((seg for seg in urlsplit(url).path.split("/") if seg), "")


class QuantumSpider(Spider):
    name = "quantum-journal"

    def __init__(self, params: ScrapeParams, seen: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.params = params
        self.start_urls = list(params.start_urls)
        self.site_hosts = sorted({urlsplit(u).hostname for u in params.start_urls if urlsplit(u).hostname})
        extra = [urlsplit(params.full_text_url.format(arxiv_id="x")).hostname] if params.full_text else []
        self.allowed_domains = sorted(set(self.site_hosts) | {h for h in extra if h})
        self.seen = set(seen)  # DOIs already fetched by an earlier crawl (full records in the cache)
        self.stats_local: Counter[str] = Counter()
        self.papers: dict[str, PaperItem] = {}  # what the crawl produced (on_item_scraped)
        self.errors: list[ErrorItem] = []
        self._counted: set[str] = set()
        self._pages: set[str] = set()  # canonical URLs of the non-paper pages requested so far
        # (LinkExtractor's allow_domains compares host:port, so in-site filtering is done in onsite_links)
        self.links = LinkExtractor(deny=DENY_LINKS)

    # -- start: the start URLs and each site's robots.txt (for its Sitemap: lines) ----------------------------------
    async def start(self) -> AsyncIterator[Any]:
        for url in self.start_urls:
            for req in self.paper_request(url) if paper_id_from_url(url) else self.page_request(url, 0, start=True):
                yield req
        # obeying robots.txt, the one RobotsTxtMiddleware fetches is read once parsed (on_robots_parsed)
        if not self.params.obey_robots:
            for origin in dict.fromkeys(f"{p.scheme}://{p.netloc}" for p in map(urlsplit, self.start_urls)):
                yield Request(f"{origin}/robots.txt", callback=self.parse_robots, errback=self.quiet_failure,
                              meta={"qrb_kind": "robots", "dont_obey_robotstxt": True}, priority=-1)

    @classmethod
    def from_crawler(cls, crawler: Any, *args: Any, **kwargs: Any) -> "QuantumSpider":
        from scrapy import signals

        spider = super().from_crawler(crawler, *args, **kwargs)
        crawler.signals.connect(spider.on_robots_parsed, signal=signals.robots_parsed)
        crawler.signals.connect(spider.on_item_scraped, signal=signals.item_scraped)
        return spider

    def on_item_scraped(self, item: Any) -> None:
        """Keep the items: papers by DOI (a paper reached at two URLs once), error records in order."""
        if isinstance(item, PaperItem):
            old = self.papers.get(item.doi)
            if old is None or item.url < old.url:  # same paper at two URLs: keep one, deterministically
                self.papers[item.doi] = item
        elif isinstance(item, ErrorItem):
            self.errors.append(item)

    def on_robots_parsed(self, robotparser: Any, request: Request) -> None:
        """Follow the Sitemap: lines of a robots.txt that RobotsTxtMiddleware parsed (scrapy's Protego parser)."""
        for req in self._sitemap_requests(request.url, list(robotparser.rp.sitemaps)):
            self.crawler.engine.crawl(req)

    def _sitemap_requests(self, base_url: str, urls: list[str]) -> Iterable[Request]:
        for u in urls:
            url = urljoin(base_url, u.strip())
            if urlsplit(url).hostname in self.site_hosts:
                yield Request(url, callback=self.parse_sitemap, errback=self.failed,
                              meta={"qrb_kind": "sitemap"})

    # -- discovery ----------------------------------------------------------------------------------------------
    def onsite_links(self, links: list[Any]) -> list[Any]:
        return [lk for lk in links if urlsplit(lk.url).hostname in self.site_hosts]

    def page_request(self, url: str, hops: int, start: bool = False) -> Iterator[Request]:
        """The request for a non-paper page `hops` hops from a start URL or listing; none when already requested or
        over the discovery cap (a start URL is always requested)."""
        key = canonicalize_url(url)
        if key in self._pages:
            return
        if not start and self.stats_local["discovery_requests"] >= self.params.max_discovery_pages:
            self.stats_local["discovery_cap_refused"] += 1
            return
        self._pages.add(key)
        if not start:
            self.stats_local["discovery_requests"] += 1
        yield Request(url, callback=self.parse_page, errback=self.failed if start else self.link_failed,
                       meta={"qrb_kind": "listing" if start else "link", "qrb_hops": hops})

    def parse_page(self, response: Response) -> Iterable[Any]:
        """A start URL or a followed link: a paper (by content), a listing (links papers) or a hop. From a listing
        only the links in its own section (its pagination, its sibling volumes; not the site's menus) are followed,
        and they start the hop count afresh, so a long chain of "older papers" pages costs no depth."""
        if not isinstance(response, HtmlResponse):  # a feed, a file: nothing to read or follow
            self.stats_local["other_pages_fetched"] += 1
            return
        if response.xpath("//head/meta[@name='citation_title' or @name='citation_doi']"):  # a paper, by its meta tags
            yield from self.parse_paper(response)
            return
        links = self.onsite_links(self.links.extract_links(response))
        papers = [lk.url for lk in links if paper_id_from_url(lk.url)]
        listing = bool(papers)
        self.stats_local["listing_pages_fetched" if listing else "other_pages_fetched"] += 1
        for url in papers:
            yield from self.paper_request(url)
        hops = 1 if listing else response.meta.get("qrb_hops", 0) + 1
        if hops > self.params.max_depth:
            return
        own = section(response.url) if listing else ""
        for lk in links:
            if not paper_id_from_url(lk.url) and (not own or section(lk.url) == own):
                yield from self.page_request(lk.url, hops)

    def paper_request(self, url: str) -> Iterator[Request]:
        """The request for a paper page; none for a URL of another shape, outside the date window or already seen
        (nothing is fetched for those)."""
        pid = paper_id_from_url(url)
        if pid is None:
            return
        pid_str, day = pid
        doi = f"10.22331/{pid_str}"
        first = doi not in self._counted
        self._counted.add(doi)
        if not (self.params.date_from <= day <= self.params.date_to):
            if first:
                self.stats_local["skipped_by_date"] += 1
            return
        if doi in self.seen:
            if first:
                self.stats_local["skipped_seen"] += 1
            return
        # canonical form: scheme://host/papers/<id>/ (no query, fragment or missing slash)
        parts = urlsplit(url)
        canon = f"{parts.scheme}://{parts.netloc}{PAPER_PATH_RE.sub('', parts.path)}/papers/{pid_str}/"
        # papers before more discovery: what a capped crawl spends its requests on first
        yield Request(canon, callback=self.parse_paper, errback=self.failed, meta={"qrb_kind": "paper"},
                       priority=PAPER_PRIORITY)

    def parse_robots(self, response: Response) -> Iterable[Request]:
        yield from self._sitemap_requests(response.url, list(sitemap_urls_from_robots(response.body, response.url)))

    def parse_sitemap(self, response: Response) -> Iterable[Any]:
        """Paper URLs (and nested sitemaps) from a sitemap; its other pages are left to link discovery."""
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
        if sm.type == "sitemapindex":
            yield from self._sitemap_requests(response.url, locs)
            return
        for loc in locs:
            url = urljoin(response.url, loc.strip())
            if urlsplit(url).hostname in self.site_hosts:
                yield from self.paper_request(url)

    # -- paper pages ----------------------------------------------------------------------------------------------
    def parse_paper(self, response: Response) -> Iterable[Any]:
        self.stats_local["paper_pages_fetched"] += 1
        url = original_url(response.request) if response.request is not None else response.url
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
            yield Request(self.params.full_text_url.format(arxiv_id=arxiv_id), callback=self.parse_full_text,
                          errback=self.full_text_failed, cb_kwargs={"item": item}, meta={"qrb_kind": "full_text"})
            return
        yield item

    def parse_full_text(self, response: Response, item: PaperItem) -> Iterable[Any]:
        self.stats_local["full_text_fetched"] += 1
        if isinstance(response, TextResponse):
            item.full_text = parse_full_text_html(response.text)
        yield item

    def full_text_failed(self, failure: Failure) -> Iterable[Any]:
        self.stats_local["full_text_failed"] += 1
        log.warning("scrape: full text not fetched (%s): %s", failure_reason(failure)[0], failure.request.url)
        yield failure.request.cb_kwargs["item"]  # the paper record stands without its full text

    # -- failures -------------------------------------------------------------------------------------------------
    def failed(self, failure: Failure) -> Iterable[Any]:
        """A start URL, sitemap or paper page: recorded with its kind."""
        reason, detail = failure_reason(failure)
        kind = failure.request.meta.get("qrb_kind", "listing")
        yield ErrorItem(url=original_url(failure.request), reason=reason, detail=detail, kind=kind)

    def link_failed(self, failure: Failure) -> Iterable[Any]:
        """A followed link: "nothing here" (404, robots.txt, offsite) is counted; a failure that may hide papers (a
        5xx after its retries, a time-out) is recorded."""
        reason, detail = failure_reason(failure)
        self.stats_local["discovery_failed"] += 1
        if reason in QUIET_LINK_FAILURES:
            log.info("scrape: followed link %s not fetched (%s)", failure.request.url, reason)
            return
        yield ErrorItem(url=original_url(failure.request), reason=reason, detail=detail, kind="link")

    def quiet_failure(self, failure: Failure) -> None:
        log.info("scrape: %s not fetched (%s)", failure.request.url, failure_reason(failure)[0])
