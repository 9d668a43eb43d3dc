"""Downloader middleware: exponential backoff before each retry (scrapy's RetryMiddleware retries at once)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)


class RetryBackoffMiddleware:
    """Wait `base * 2**(n-1)` seconds (capped) before the n-th retry of a request; the wait holds no download slot
    (it runs before the request is queued), so other pages keep flowing."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self.base_s = base_s
        self.max_s = max_s

    @classmethod
    def from_crawler(cls, crawler: Any) -> "RetryBackoffMiddleware":
        s = crawler.settings
        return cls(s.getfloat("QRB_RETRY_BACKOFF_BASE_S", 1.0), s.getfloat("QRB_RETRY_BACKOFF_MAX_S", 60.0))

    async def process_request(self, request: Any) -> None:
        n = request.meta.get("retry_times", 0)
        if n and self.base_s > 0:
            delay = min(self.max_s, self.base_s * 2 ** (n - 1))
            log.info("scrape: retry %d of %s in %.1f s", n, request.url, delay)
            await asyncio.sleep(delay)
        return None


class OffsiteRedirectMiddleware:
    """Refuse a redirect to a host outside `allowed_domains` with an `IgnoreRequest` raised from process_response,
    so the request's errback records it (scrapy's own offsite filter drops a redirected request silently, at
    scheduling time). Sits before RedirectMiddleware (600) in the response chain."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> "OffsiteRedirectMiddleware":
        return cls(crawler)

    def process_response(self, request: Any, response: Any) -> Any:
        from urllib.parse import urljoin, urlsplit

        from scrapy.exceptions import IgnoreRequest

        if response.status not in (301, 302, 303, 307, 308) or b"Location" not in response.headers:
            return response
        if request.meta.get("dont_redirect"):
            return response
        target = urljoin(request.url, response.headers[b"Location"].decode("latin-1"))
        host = (urlsplit(target).hostname or "").lower()
        allowed = [d.lower() for d in (getattr(self.crawler.spider, "allowed_domains", None) or [])]
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            self.crawler.stats.inc_value("offsite/redirect_refused")
            raise IgnoreRequest(f"Offsite redirect refused: {request.url} -> {target}")
        return response


class PageCapMiddleware:
    """A hard cap on requests sent per crawl (`scrape.max_pages`, retries and robots.txt included). Scrapy's
    CLOSESPIDER_PAGECOUNT closes the spider at the cap but lets queued requests through; this refuses them (each
    becomes an error record with reason `page_cap`, so nothing is dropped silently)."""

    def __init__(self, crawler: Any, cap: int) -> None:
        self.crawler = crawler
        self.cap = cap
        self.sent = 0

    @classmethod
    def from_crawler(cls, crawler: Any) -> "PageCapMiddleware":
        return cls(crawler, crawler.settings.getint("QRB_MAX_PAGES", 0))

    def process_request(self, request: Any) -> None:
        from scrapy.exceptions import IgnoreRequest

        if self.cap and self.sent >= self.cap:
            self.crawler.stats.inc_value("qrb/page_cap_refused")
            raise IgnoreRequest(f"Page cap reached ({self.cap} requests)")
        self.sent += 1
        return None
