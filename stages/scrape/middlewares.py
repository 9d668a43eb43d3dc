"""Downloader middlewares: exponential backoff before each retry (scrapy's RetryMiddleware retries at once), offsite
redirects refused as errors, a hard page cap, and robots.txt `Crawl-delay` (scrapy's parsers read it, nothing applies
it); and the HTTP cache policy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urljoin, urlsplit

from scrapy.exceptions import IgnoreRequest
from scrapy.extensions.httpcache import RFC2616Policy, parse_cachecontrol

log = logging.getLogger(__name__)


class RevalidatingPolicy(RFC2616Policy):
    """scrapy's RFC 2616 cache policy, except that a cached page marked `Cache-Control: no-cache` is revalidated
    (If-None-Match / If-Modified-Since; a 304 keeps the cached body) where scrapy fetches it again in full. Revalidate
    is what no-cache means (RFC 9111 5.2.2.4), and it is what a listing that changes with every new paper says."""

    def is_cached_response_fresh(self, cachedresponse: Any, request: Any) -> bool:
        if b"no-cache" not in parse_cachecontrol(cachedresponse.headers.get(b"Cache-Control", b"")):
            return super().is_cached_response_fresh(cachedresponse, request)
        for have, ask in ((b"ETag", b"If-None-Match"), (b"Last-Modified", b"If-Modified-Since")):
            if have in cachedresponse.headers:
                request.headers[ask] = cachedresponse.headers[have]
        return False


class _Middleware:
    """Built by scrapy with the crawler (its settings, stats, engine, spider)."""

    def __init__(self, crawler: Any) -> None:
        self.crawler = crawler

    @classmethod
    def from_crawler(cls, crawler: Any) -> Any:
        return cls(crawler)


class RetryBackoffMiddleware(_Middleware):
    """Wait `base * 2**(n-1)` seconds (capped) before the n-th retry of a request; the wait holds no download slot
    (it runs before the request is queued), so other pages keep flowing."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.base_s = crawler.settings.getfloat("QRB_RETRY_BACKOFF_BASE_S", 1.0)
        self.max_s = crawler.settings.getfloat("QRB_RETRY_BACKOFF_MAX_S", 60.0)

    async def process_request(self, request: Any) -> None:
        n = request.meta.get("retry_times", 0)
        if n and self.base_s > 0:
            delay = min(self.max_s, self.base_s * 2 ** (n - 1))
            log.info("scrape: retry %d of %s in %.1f s", n, request.url, delay)
            await asyncio.sleep(delay)


class OffsiteRedirectMiddleware(_Middleware):
    """Refuse a redirect to a host outside `allowed_domains` with an `IgnoreRequest` raised from process_response,
    so the request's errback records it (scrapy's own offsite filter drops a redirected request silently, at
    scheduling time). Sits before RedirectMiddleware (600) in the response chain."""

    def process_response(self, request: Any, response: Any) -> Any:
        if (response.status not in (301, 302, 303, 307, 308) or b"Location" not in response.headers
                or request.meta.get("dont_redirect")):
            return response
        target = urljoin(request.url, response.headers[b"Location"].decode("latin-1"))
        host = (urlsplit(target).hostname or "").lower()
        allowed = [d.lower() for d in (getattr(self.crawler.spider, "allowed_domains", None) or [])]
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            self.crawler.stats.inc_value("offsite/redirect_refused")
            raise IgnoreRequest(f"Offsite redirect refused: {request.url} -> {target}")
        return response


class PageCapMiddleware(_Middleware):
    """A hard cap on HTTP requests sent per crawl (`scrape.max_pages`, retries and robots.txt included; answers from
    the HTTP cache not, as it sits after HttpCacheMiddleware). Scrapy's CLOSESPIDER_PAGECOUNT counts responses (cache
    hits too) and lets queued requests through; this refuses every request over the cap (each becomes an error
    record with reason `page_cap`, so nothing is dropped silently)."""

    def __init__(self, crawler: Any) -> None:
        super().__init__(crawler)
        self.cap = crawler.settings.getint("QRB_MAX_PAGES", 0)
        self.sent = 0

    def process_request(self, request: Any) -> None:
        if self.cap and self.sent >= self.cap:
            self.crawler.stats.inc_value("qrb/page_cap_refused")
            raise IgnoreRequest(f"Page cap reached ({self.cap} requests)")
        self.sent += 1
        self.crawler.stats.set_value("qrb/requests_sent", self.sent)


class CrawlDelayMiddleware(_Middleware):
    """Honour a robots.txt `Crawl-delay` as the floor of that site's download slot.

    The delay is read when RobotsTxtMiddleware has parsed the file (signal `robots_parsed`) and set on the slot and
    on the slot settings new slots are made from. AutoThrottle moves a slot's delay after every response and may go
    below it, so the floor is put back right after (`response_downloaded`: this handler connects after
    AutoThrottle's, before the downloader takes the next request), and the slot's jitter is narrowed so that
    delay x (1 - jitter) never drops under the floor."""

    def __init__(self, crawler: Any) -> None:
        from scrapy import signals

        super().__init__(crawler)
        s = crawler.settings
        self.user_agent = s.get("ROBOTSTXT_USER_AGENT") or s.get("USER_AGENT")
        self.jitter = s.getfloat("DOWNLOAD_DELAY_JITTER", 0.5)
        self.floors: dict[str, float] = {}  # download slot key -> Crawl-delay seconds
        crawler.signals.connect(self.on_robots_parsed, signal=signals.robots_parsed)
        crawler.signals.connect(self.on_response_downloaded, signal=signals.response_downloaded)

    def on_robots_parsed(self, robotparser: Any, request: Any) -> None:
        delay = robotparser.crawl_delay(self.user_agent)
        if not delay or delay <= 0:
            return
        downloader = self.crawler.engine.downloader
        key = downloader.get_slot_key(request)
        self.floors[key] = float(delay)
        downloader.per_slot_settings.setdefault(key, {})["delay"] = float(delay)  # slots made later start there
        self.crawler.stats.max_value("qrb/crawl_delay_s", float(delay))
        log.info("scrape: robots.txt of %s asks Crawl-delay %.2f s: at most one request per %.2f s", key, delay, delay)
        self.apply(key)

    def on_response_downloaded(self, response: Any, request: Any, spider: Any = None) -> None:
        self.apply(request.meta.get("download_slot"))

    def process_request(self, request: Any) -> None:
        if self.floors:
            self.apply(self.crawler.engine.downloader.get_slot_key(request))

    def apply(self, key: str | None) -> None:
        floor = self.floors.get(key or "")
        slot = self.crawler.engine.downloader.slots.get(key) if floor else None
        if slot is None:
            return
        slot.delay = max(slot.delay, floor)
        slot.jitter = min(self.jitter, 1.0 - floor / slot.delay)
