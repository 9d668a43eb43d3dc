"""The mirror's server: its injected faults (`Fault`), its state (`Mirror`: papers, request counts), the HTTP
handler and `serve_mirror`, which runs it in a background thread."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from html import escape as e
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from standins import Handler, serve

from .site import (
    LAYOUTS,
    load_corpus,
    page_doc,
    page_record,
    paper_path,
    render_front,
    render_listing,
    render_malformed,
    render_paper,
    render_robots,
    render_sitemap,
    render_volume,
    render_volumes,
)

log = logging.getLogger(__name__)

# Bad cases. Each is tied to one path; `paper` faults break a real snapshot paper's page (and the crawl must still
# get it), the others are extra listing entries that must become error records.
FAULT_KINDS = {
    "not_found": "listed paper URL answers 404",
    "error_once": "a real paper answers 500 once, then 200 (a retry gets it)",
    "slow": "a real paper answers after `delay_s` seconds (default 1.0)",
    "malformed": "listed paper page whose HTML is broken beyond recovery (no title, no abstract)",
    "no_abstract": "listed paper page with every block but the Abstract",
    "offsite_redirect": "listed paper URL that redirects (302) to another host (localhost vs 127.0.0.1)",
    "disallowed": "listed paper URL under a path robots.txt disallows",
}


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    path: str | None = None  # None: the mirror picks (a real paper for error_once/slow, a synthetic path otherwise)
    delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"mirror: unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}")


DEFAULT_FAULTS: tuple[Fault, ...] = tuple(Fault(k) for k in FAULT_KINDS)

# Synthetic paper ids of the extra (bad) listing entries: inside the card's 2024 H2 window, page numbers no real
# paper has.
SYNTHETIC = {
    "not_found": "q-2024-09-30-9001",
    "malformed": "q-2024-10-30-9002",
    "no_abstract": "q-2024-11-29-9003",
    "offsite_redirect": "q-2024-12-30-9004",
    "disallowed": "q-2024-08-30-9005",
}

# How long a client may reuse a page without asking again (`Cache-Control`), as a journal's CDN might say it: a
# published paper's page hardly changes, a listing, the sitemap and robots.txt change with every new paper (clients
# revalidate them with the ETag every page carries, and get 304 when nothing changed).
PAPER_MAX_AGE_S = 86400
REVALIDATE = "no-cache"


class Mirror:
    """The mirror's state; `serve_mirror` wraps it in a server. `layout`: where the paper listing lives (`LAYOUTS`);
    `sitemap=False` serves no sitemap (and robots.txt names none); `crawl_delay` adds a `Crawl-delay:` line."""

    def __init__(self, records: Iterable[dict[str, Any]], faults: Iterable[Fault] | None = None,
                 per_page: int = 5, layout: str = "papers", sitemap: bool = True,
                 crawl_delay: float | None = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"mirror: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        self.per_page = per_page
        self.layout = layout
        self.nav = LAYOUTS[layout]
        self.sitemap = sitemap
        self.crawl_delay = crawl_delay
        self._lock = threading.Lock()
        self.papers: dict[str, dict[str, Any]] = {}  # path -> page_record
        self.counts: Counter[str] = Counter()  # path (no query) -> requests
        self.host_counts: Counter[str] = Counter()  # Host header (without port) -> requests
        self.log: list[tuple[str, str, int]] = []  # (host, path, status)
        self.times: list[tuple[float, str]] = []  # (time.monotonic() at arrival, path)
        self.user_agents: Counter[str] = Counter()
        for rec in records:
            self.add_record(rec)
        self.faults: dict[str, Fault] = {}  # path -> fault
        self._extra: dict[str, dict[str, Any]] = {}  # synthetic bad listing entries: path -> page_record
        self._served_once: set[str] = set()
        for f in faults or ():
            self._add_fault(f)
        self.url = ""

    # -- content ----------------------------------------------------------------------------------------------
    def add_record(self, rec: dict[str, Any]) -> str:
        """Add (or replace) a paper; it appears on the listing and in the sitemap at once. Returns its path."""
        p = page_record(rec)
        path = paper_path(p["doi"])
        with self._lock:
            self.papers[path] = p
        return path

    def _add_fault(self, f: Fault) -> None:
        if f.kind in ("error_once", "slow"):
            path = f.path
            if path is None:  # a real paper in the card's window, a different one per kind
                free = sorted(k for k, p in self.papers.items()
                              if "2024-07-01" <= p["published"] <= "2024-12-31" and k not in self.faults)
                if not free:
                    raise ValueError(f"mirror: no paper left for fault {f.kind}")
                path = free[0 if f.kind == "error_once" else len(free) // 2]
            elif path not in self.papers:
                raise ValueError(f"mirror: fault {f.kind}: no paper at {path}")
        else:
            path = f.path or f"/papers/{SYNTHETIC[f.kind]}/"
            m = re.search(r"/papers/(q-\d{4}-\d{2}-\d{2}-\d+)/", path)
            doi = f"10.22331/{m.group(1)}" if m else "10.22331/q-2024-09-30-9999"
            self._extra[path] = page_record({"doi": doi, "title": f"Synthetic {f.kind} page",
                                             "abstract": f"A synthetic {f.kind} test page."})
        self.faults[path] = dataclasses.replace(f, path=path)

    def fault_paths(self) -> dict[str, str]:
        """kind -> path of each injected fault."""
        return {f.kind: path for path, f in self.faults.items()}

    def _listed(self) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self.papers.values()) + list(self._extra.values())
        return sorted(items, key=lambda p: (p["published"], int(p["page"])), reverse=True)

    def listing_pages(self) -> int:
        return max(1, -(-len(self._listed()) // self.per_page))

    def _volumes(self) -> list[tuple[str, str]]:
        vols = {p["volume"]: p["published"][:4] for p in self._listed()}
        return sorted(vols.items(), key=lambda kv: int(kv[0]), reverse=True)

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def respond(self, host: str, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, delay_s) for GET `path` with Host `host` (no port). A 200 page carries an ETag
        (of its body) and a `Cache-Control` (see PAPER_MAX_AGE_S); `handle` answers 304 to a matching
        If-None-Match."""
        status, headers, body, delay = self._route(host, path)
        if status == 200 and not headers.get("Content-Type", "").startswith("application/pdf"):
            paper = bool(re.fullmatch(r"/papers/q-\d{4}-\d{2}-\d{2}-\d+/|/arxiv/html/.+", path))
            headers = {**headers, "ETag": '"' + hashlib.sha1(body).hexdigest()[:20] + '"',
                       "Cache-Control": f"max-age={PAPER_MAX_AGE_S}" if paper else REVALIDATE}
        return status, headers, body, delay

    def _not_found(self) -> tuple[int, dict[str, str], bytes, float]:
        body = page_doc("Not found", "", "<h1>Page not found</h1>\n", self.nav).encode()
        return 404, {"Content-Type": "text/html; charset=utf-8"}, body, 0.0

    def _route(self, host: str, path: str) -> tuple[int, dict[str, str], bytes, float]:
        html_t = {"Content-Type": "text/html; charset=utf-8"}
        fault = self.faults.get(path)
        if fault is not None:
            if fault.kind == "not_found":
                return self._not_found()
            if fault.kind == "error_once":
                with self._lock:
                    first = path not in self._served_once
                    self._served_once.add(path)
                if first:
                    return 500, html_t, page_doc("Error", "", "<h1>Internal Server Error</h1>\n").encode(), 0.0
            if fault.kind == "offsite_redirect":
                other = "localhost" if host != "localhost" else "127.0.0.1"
                port = urlsplit(self.url).port
                return 302, {"Location": f"http://{other}:{port}{path}"}, b"", 0.0
            if fault.kind == "malformed":
                return 200, html_t, render_malformed(self._extra[path]).encode(), 0.0
            if fault.kind == "no_abstract":
                return 200, html_t, render_paper(self._extra[path], abstract=False, nav=self.nav).encode(), 0.0
            if fault.kind == "disallowed":  # a polite crawler never gets here
                return 200, html_t, render_paper(self._extra[path], nav=self.nav).encode(), 0.0
        delay = fault.delay_s if fault is not None and fault.kind == "slow" else 0.0

        disallowed = [p for p, f in self.faults.items() if f.kind == "disallowed"]
        if path == "/robots.txt":
            body = render_robots(["/wp-admin/", *disallowed], f"{self.url}/sitemap.xml" if self.sitemap else None,
                                 self.crawl_delay)
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, body.encode(), 0.0
        if path == "/sitemap.xml" and self.sitemap:  # every listing page of the layout, then the papers
            if self.layout == "issues":
                pages = ["/issues/"] + [f"/issues/{v}/" for v, _ in self._volumes()]
            else:
                pages = [self.nav] + [f"{self.nav}page/{i}/" for i in range(2, self.listing_pages() + 1)]
            pages += [paper_path(p["doi"]) for p in self._listed() if paper_path(p["doi"]) not in disallowed]
            locs = [f"{self.url}{u}" for u in pages]
            return 200, {"Content-Type": "application/xml; charset=utf-8"}, render_sitemap(locs).encode(), 0.0
        if path == "/" and self.layout != "papers":
            return 200, html_t, render_front(self.nav).encode(), 0.0
        if self.layout == "issues":
            if path == "/issues/":
                return 200, html_t, render_volumes(self._volumes(), self.nav).encode(), delay
            m = re.fullmatch(r"/issues/(\d+)/", path)
            vol = [p for p in self._listed() if m and p["volume"] == m.group(1)]
            if vol:
                return 200, html_t, render_volume(m.group(1), vol, self.nav).encode(), delay
        else:
            m = re.fullmatch(re.escape(self.nav) + r"page/(\d+)/", path)
            if m or path in ("/", self.nav):
                n = int(m.group(1)) if m else 1
                items, pages = self._listed(), self.listing_pages()
                if n < 1 or n > pages:
                    return self._not_found()
                chunk = items[(n - 1) * self.per_page: n * self.per_page]
                return 200, html_t, render_listing(chunk, n, pages, self.nav, self.nav).encode(), delay
        if m := re.fullmatch(r"(/papers/q-\d{4}-\d{2}-\d{2}-\d+/)(pdf/)?", path):
            with self._lock:
                p = self.papers.get(m.group(1))
            if p is None:
                return self._not_found()
            if m.group(2):
                return 200, {"Content-Type": "application/pdf"}, b"%PDF-1.4\n% stub\n", 0.0
            return 200, html_t, render_paper(p, nav=self.nav).encode(), delay
        if m := re.fullmatch(r"/arxiv/html/(.+)", path):
            with self._lock:
                hit = [p for p in self.papers.values() if p["arxiv"] and p["arxiv"].removeprefix("arXiv:") == m.group(1)]
            if hit:
                body = (f"<article class=\"ltx_document\"><h1>{e(hit[0]['title'])}</h1><h6>Abstract</h6>"
                        f"<p>{e(hit[0]['abstract'])}</p><section><h2>1 Introduction</h2><p>Full text of "
                        f"{e(hit[0]['arxiv'])} (stand-in).</p></section></article>")
                return 200, html_t, page_doc(hit[0]["title"], "", body).encode(), 0.0
        return self._not_found()

    def handle(self, h: Handler) -> None:
        """Answer one GET: `respond`, or 304 to a matching If-None-Match; counted and logged."""
        t = time.monotonic()
        host = (h.headers.get("Host") or "").rsplit(":", 1)[0]
        path = urlsplit(h.path).path
        try:
            status, headers, body, delay = self.respond(host, path)
        except Exception:  # never kill the server thread
            log.exception("mirror: error serving %s", path)
            status, headers, body, delay = 500, {"Content-Type": "text/plain"}, b"mirror error\n", 0.0
        etag = headers.get("ETag")
        if etag and etag in [x.strip() for x in (h.headers.get("If-None-Match") or "").split(",")]:
            status, body = 304, b""  # the client's copy is current (RFC 9110 13.1.2)
            headers = {k: v for k, v in headers.items() if k in ("ETag", "Cache-Control")}
        with self._lock:
            self.counts[path] += 1
            self.host_counts[host] += 1
            self.log.append((host, path, status))
            self.times.append((t, path))
            self.user_agents[h.headers.get("User-Agent", "")] += 1
        if delay:
            time.sleep(delay)
        h.reply(status, {**headers, "Content-Length": str(len(body))}, body)

    @property
    def start_url(self) -> str:
        return f"{self.url}{self.nav}" if self.layout == "papers" else f"{self.url}/"


class _Handler(Handler):
    server_version = "qrb-mirror/0.1"


@contextlib.contextmanager
def serve_mirror(corpus_dir: str | Path, port: int = 0, faults: Iterable[Fault] | None = None,
                 host: str = "127.0.0.1", per_page: int = 5, layout: str = "papers", sitemap: bool = True,
                 crawl_delay: float | None = None) -> Iterator[Mirror]:
    """Serve the mirror in a background thread; yields the `Mirror` (`.url`, `.counts`, `add_record`, ...)."""
    mirror = Mirror(load_corpus(corpus_dir), faults=faults, per_page=per_page, layout=layout, sitemap=sitemap,
                    crawl_delay=crawl_delay)
    with serve(mirror, host, port, _Handler, "qrb-mirror") as (_, bound):
        mirror.url = f"http://{host}:{bound}"
        yield mirror

