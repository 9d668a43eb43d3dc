"""The scrape stage's I/O: params -> scrapy settings -> one in-process crawl -> outputs (see `stages.scrape`).

`assemble` is the pure core (cached records + crawl results -> papers, errors, new cache); `crawl` runs the spider
(once per process: Twisted's reactor cannot be restarted, so tests that crawl twice run `python -m stages.scrape`
as a subprocess); `main` ties them to the files `dvc.yaml` declares.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError, TransientError
from qrb.io import read_jsonl, write_json, write_jsonl, write_metrics
from qrb.schema import PAPER_KEYS
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, ScrapeParams

log = logging.getLogger(__name__)

PAPERS_OUT = Path("artifacts/scrape/papers.jsonl")
ERRORS_OUT = Path("artifacts/scrape/errors.jsonl")
METRICS_OUT = Path("metrics/scrape.json")  # the headline numbers (dvc metrics); the whole record in REPORT_OUT
REPORT_OUT = Path("reports/scrape.json")
HEADLINE = ("papers_kept", "papers_new", "pages_fetched", "requests", "errors")
CACHE_DIR = Path("cache/scrape")
CACHE_RECORDS = CACHE_DIR / "records.jsonl"
HTTP_CACHE_DIR = CACHE_DIR / "http"
CACHE_VERSION = 1
# the crawl's counters read from scrapy's stats (the qrb/ ones are our middlewares')
SCRAPY_COUNTS = {"pages_fetched": "response_received_count", "requests": "qrb/requests_sent",
                 "http_cache_hits": "httpcache/hit", "http_cache_revalidated": "httpcache/revalidate",
                 "retries": "retry/count", "robots_forbidden": "robotstxt/forbidden",
                 "page_cap_refused": "qrb/page_cap_refused"}


def scrapy_settings(p: ScrapeParams) -> dict[str, Any]:
    """Scrapy settings from the stage params: the politeness rules live here."""
    return {
        "BOT_NAME": "quantum-research-bot",
        "USER_AGENT": p.user_agent,
        "ROBOTSTXT_OBEY": p.obey_robots,
        "CONCURRENT_REQUESTS": max(8, p.concurrent_requests_per_domain),
        "CONCURRENT_REQUESTS_PER_DOMAIN": p.concurrent_requests_per_domain,
        "DOWNLOAD_DELAY": p.download_delay_s,  # x U(0.5, 1.5): scrapy's DOWNLOAD_DELAY_JITTER (0.5)
        "AUTOTHROTTLE_ENABLED": p.autothrottle,
        "AUTOTHROTTLE_START_DELAY": p.autothrottle_start_delay_s,
        "AUTOTHROTTLE_MAX_DELAY": p.autothrottle_max_delay_s,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": float(p.concurrent_requests_per_domain),
        "RETRY_ENABLED": p.retry_times > 0,
        "RETRY_TIMES": p.retry_times,  # RETRY_HTTP_CODES default: 500 502 503 504 522 524 408 429; + time-outs
        "QRB_RETRY_BACKOFF_BASE_S": max(0.5, p.download_delay_s),
        "QRB_RETRY_BACKOFF_MAX_S": max(1.0, p.autothrottle_max_delay_s),
        "DOWNLOAD_TIMEOUT": p.timeout_s,
        "DNS_TIMEOUT": p.timeout_s,
        "REDIRECT_MAX_TIMES": 5,
        "COOKIES_ENABLED": False,
        "TELNETCONSOLE_ENABLED": False,
        # The HTTP cache, by the server's own rules (RFC 2616: Cache-Control, Expires, ETag / Last-Modified; see
        # RevalidatingPolicy): a page still fresh is not fetched again, a stale one is revalidated (If-None-Match ->
        # 304, no body). It saves what the seen-set cannot: pages of papers fetched again (full_text switched on, a
        # run that failed before its records were saved), and the bodies of listings that did not change. Kept with
        # the seen-set in cache/scrape/ (persisted by DVC); entries expire by the policy only, not by age.
        "HTTPCACHE_ENABLED": True,
        "HTTPCACHE_POLICY": "stages.scrape.middlewares.RevalidatingPolicy",
        "HTTPCACHE_DIR": str(HTTP_CACHE_DIR.resolve()),  # absolute: scrapy puts a relative one under .scrapy/
        "HTTPCACHE_GZIP": True,  # FilesystemCacheStorage and HTTPCACHE_EXPIRATION_SECS 0: scrapy's defaults
        "LOG_LEVEL": "INFO",
        "LOG_INSTALL_ROOT_HANDLER": False,  # qrb.io.setup_logging owns the root handler
        "QRB_MAX_PAGES": p.max_pages,
        # the page cap (the one cap: CLOSESPIDER_PAGECOUNT would count cache hits) after HttpCacheMiddleware (900):
        # an answer from the cache costs the site nothing
        "DOWNLOADER_MIDDLEWARES": {"stages.scrape.middlewares.RetryBackoffMiddleware": 560,
                                   "stages.scrape.middlewares.OffsiteRedirectMiddleware": 650,
                                   "stages.scrape.middlewares.PageCapMiddleware": 950,
                                   "stages.scrape.middlewares.CrawlDelayMiddleware": 960},
    }


@dataclasses.dataclass
class CrawlResult:
    papers: list[dict[str, Any]]  # records fetched by this crawl
    errors: list[dict[str, Any]]
    stats: dict[str, Any]  # the spider's counters + scrapy's stats that the metrics use


def crawl(p: ScrapeParams, seen: set[str]) -> CrawlResult:
    """Run the spider once, in this process."""
    from scrapy.crawler import AsyncCrawlerProcess

    from .spider import QuantumSpider

    process = AsyncCrawlerProcess(scrapy_settings(p))
    for name in ("scrapy", "twisted", "protego", "py.warnings"):
        logging.getLogger(name).setLevel(logging.INFO)
    crawler = process.create_crawler(QuantumSpider)
    process.crawl(crawler, params=p, seen=seen)
    process.start()
    spider = crawler.spider
    st = crawler.stats.get_stats() if crawler.stats else {}
    stats = dict(spider.stats_local) | {k: int(st.get(v, 0)) for k, v in SCRAPY_COUNTS.items()} | {
        "offsite_filtered": int(st.get("offsite/filtered", 0)) + int(st.get("offsite/redirect_refused", 0)),
        "crawl_delay_s": st.get("qrb/crawl_delay_s"),
        "finish_reason": str(st.get("finish_reason", "")),
    }
    return CrawlResult(papers=[it.record(with_full_text=p.full_text) for it in spider.papers.values()],
                       errors=[e.record() for e in spider.errors], stats=stats)


def load_cache(path: Path = CACHE_RECORDS) -> dict[str, dict[str, Any]]:
    """The seen-set: DOI -> full record of every paper fetched so far."""
    if not path.exists():
        return {}
    try:
        return {r["doi"]: r for r in read_jsonl(path)}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cache {path} is unreadable ({exc}); delete it to re-crawl from scratch") from None


def seen_dois(cache: dict[str, dict[str, Any]], full_text: bool) -> set[str]:
    """DOIs not to fetch again; with `full_text` on, a record cached without that key is fetched again."""
    return {d for d, r in cache.items() if not full_text or "full_text" in r}


def assemble(cache: dict[str, dict[str, Any]], new: list[dict[str, Any]], errors: list[dict[str, Any]],
             date_from: _dt.date, date_to: _dt.date, full_text: bool
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Pure core: (papers sorted by DOI within the window, errors sorted and deduplicated, the new cache).

    A newly fetched record replaces a cached one with the same DOI. The output holds exactly `PAPER_KEYS` (plus
    `full_text` when on), so the same site gives byte-identical output whether a record came from the cache or
    from the crawl."""
    merged = cache | {rec["doi"]: rec for rec in new}
    lo, hi = date_from.isoformat(), date_to.isoformat()
    keys = PAPER_KEYS + (("full_text",) if full_text else ())
    papers = [{k: rec.get(k) for k in keys} for doi, rec in sorted(merged.items())
              if lo <= (rec.get("published") or "") <= hi]
    errs = {(e["url"], e["reason"]): e for e in errors}
    return papers, [errs[k] for k in sorted(errs)], dict(sorted(merged.items()))


# the crawl's counters the metrics carry as they are (0 when the crawl never counted one)
CRAWL_COUNTS = ("pages_fetched", "requests", "retries", "listing_pages_fetched", "other_pages_fetched",
                "sitemaps_fetched", "paper_pages_fetched", "full_text_fetched", "skipped_by_date", "skipped_seen",
                "offsite_filtered", "robots_forbidden", "http_cache_hits", "http_cache_revalidated")


def metrics(result: CrawlResult, papers: list[dict[str, Any]], errors: list[dict[str, Any]],
            n_cached: int, p: ScrapeParams) -> dict[str, Any]:
    s = result.stats
    return {k: s.get(k, 0) for k in CRAWL_COUNTS} | {
        "papers_kept": len(papers),
        "papers_new": len(result.papers),
        "papers_from_cache": len({r["doi"] for r in papers} - {r["doi"] for r in result.papers}),
        "papers_in_cache": n_cached,
        "errors": len(errors),
        "errors_by_reason": dict(sorted(Counter(e["reason"] for e in errors).items())),
        "finish_reason": s.get("finish_reason", ""),
        "page_cap_hit": s.get("page_cap_refused", 0) > 0,
        "discovery_cap_hit": s.get("discovery_cap_refused", 0) > 0,
        "crawl_delay_s": s.get("crawl_delay_s"),
        "date_from": p.date_from.isoformat(),
        "date_to": p.date_to.isoformat(),
    }


def check_crawl(result: CrawlResult, papers: list[dict[str, Any]], p: ScrapeParams) -> None:
    """Raise, before anything is written, when the crawl reached nothing (TransientError) or kept no paper in the
    window although the site answered (DataError: a layout the discovery did not find, a wrong window)."""
    s = result.stats
    why = "; ".join(f"{e['url']}: {e['reason']}" for e in result.errors[:3])
    if not any(s.get(k, 0) for k in ("listing_pages_fetched", "other_pages_fetched", "sitemaps_fetched",
                                     "paper_pages_fetched")):
        raise TransientError(f"could not fetch any start URL or sitemap ({why or 'no response'}); outputs and "
                             "cache unchanged")
    if papers:
        return
    found = (f"{s.get('pages_fetched', 0)} pages fetched ({s.get('listing_pages_fetched', 0)} listing, "
             f"{s.get('other_pages_fetched', 0)} other, {s.get('sitemaps_fetched', 0)} sitemaps, "
             f"{s.get('paper_pages_fetched', 0)} paper pages), {s.get('skipped_by_date', 0)} papers outside it")
    hints = ["check scrape.start_urls and scrape.date_from/date_to, or raise scrape.max_depth "
             f"({p.max_depth}) if the listing lies deeper"]
    if s.get("page_cap_refused", 0):
        hints.insert(0, f"the page cap was hit (scrape.max_pages={p.max_pages})")
    if s.get("discovery_cap_refused", 0):
        hints.insert(0, f"the discovery cap was hit (scrape.max_discovery_pages={p.max_discovery_pages})")
    raise DataError(f"no paper in the window {p.date_from}..{p.date_to}: {found}"
                    + (f"; errors: {why}" if why else "") + f"; {'; '.join(hints)}. Outputs and cache unchanged")


def run(base: dict[str, Any], p: ScrapeParams, args) -> None:
    cache = load_cache()
    seen = seen_dois(cache, p.full_text)
    log.info("scrape: %s, window %s..%s, %d papers already in the cache", ", ".join(p.start_urls), p.date_from,
             p.date_to, len(cache))
    result = crawl(p, seen)
    papers, errors, new_cache = assemble(cache, result.papers, result.errors, p.date_from, p.date_to, p.full_text)
    check_crawl(result, papers, p)
    m = metrics(result, papers, errors, len(new_cache), p)
    write_jsonl(CACHE_RECORDS, new_cache.values())
    write_json(CACHE_DIR / "state.json", {"version": CACHE_VERSION, "records": len(new_cache)})
    write_jsonl(PAPERS_OUT, papers)
    write_jsonl(ERRORS_OUT, errors)
    write_metrics(METRICS_OUT, REPORT_OUT, m, HEADLINE)
    if m["page_cap_hit"]:
        log.warning("scrape: stopped at the page cap (scrape.max_pages=%d): the output may miss papers",
                    p.max_pages)
    if m["discovery_cap_hit"]:
        log.warning("scrape: stopped following links at scrape.max_discovery_pages=%d: the output may miss papers",
                    p.max_discovery_pages)
    log.info("scrape: %d papers (%d new, %d from cache), %d skipped by date, %d errors %s -> %s",
             m["papers_kept"], m["papers_new"], m["papers_from_cache"], m["skipped_by_date"], m["errors"],
             json.dumps(m["errors_by_reason"]), PAPERS_OUT)


def main(argv: list[str] | None = None) -> None:
    import stages.scrape

    run_stage(stages.scrape.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
