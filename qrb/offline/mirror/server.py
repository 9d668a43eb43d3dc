"""The mirror's server: its state (`Mirror`: papers, request counts, injected faults), the HTTP handler and
`serve_mirror`, which runs it in a background thread."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from html import escape as e
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .site import listing_entry, load_corpus, page_doc, page_record, paper_path, render_malformed, render_paper

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
_SYNTHETIC = {
    "not_found": "q-2024-09-30-9001",
    "malformed": "q-2024-10-30-9002",
    "no_abstract": "q-2024-11-29-9003",
    "offsite_redirect": "q-2024-12-30-9004",
    "disallowed": "q-2024-08-30-9005",
}


# ---------------------------------------------------------------------------------------------------- the server
class Mirror:
    """The mirror's state; `serve_mirror` wraps it in a server."""

    def __init__(self, records: Iterable[dict[str, Any]], faults: Iterable[Fault] | None = None,
                 per_page: int = 5) -> None:
        self.per_page = per_page
        self._lock = threading.Lock()
        self.papers: dict[str, dict[str, Any]] = {}  # path -> page_record
        self.counts: Counter[str] = Counter()  # path (no query) -> requests
        self.host_counts: Counter[str] = Counter()  # Host header (without port) -> requests
        self.log: list[tuple[str, str, int]] = []  # (host, path, status)
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
                inwin = sorted(k for k, p in self.papers.items() if "2024-07-01" <= p["published"] <= "2024-12-31")
                taken = set(self.faults)
                free = [k for k in inwin if k not in taken]
                if not free:
                    raise ValueError(f"mirror: no paper left for fault {f.kind}")
                path = free[0 if f.kind == "error_once" else len(free) // 2]
            elif path not in self.papers:
                raise ValueError(f"mirror: fault {f.kind}: no paper at {path}")
        else:
            path = f.path or f"/papers/{_SYNTHETIC[f.kind]}/"
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

    def disallowed_prefixes(self) -> list[str]:
        return ["/wp-admin/"] + [p for p, f in self.faults.items() if f.kind == "disallowed"]

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def respond(self, host: str, path: str) -> tuple[int, dict[str, str], bytes, float]:
        """(status, headers, body, delay_s) for GET `path` with Host `host` (no port)."""
        html_t = {"Content-Type": "text/html; charset=utf-8"}
        fault = self.faults.get(path)
        if fault is not None:
            if fault.kind == "not_found":
                return 404, html_t, page_doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
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
                return 200, html_t, render_paper(self._extra[path], abstract=False).encode(), 0.0
            if fault.kind == "disallowed":  # a polite crawler never gets here
                return 200, html_t, render_paper(self._extra[path]).encode(), 0.0
        delay = fault.delay_s if fault is not None and fault.kind == "slow" else 0.0

        if path in ("/robots.txt",):
            body = "User-agent: *\n" + "".join(f"Disallow: {d}\n" for d in self.disallowed_prefixes())
            body += f"\nSitemap: {self.url}/sitemap.xml\n"
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, body.encode(), 0.0
        if path == "/sitemap.xml":
            locs = [f"{self.url}/papers/"] + [f"{self.url}/papers/page/{i}/" for i in
                                              range(2, self.listing_pages() + 1)]
            locs += [f"{self.url}{paper_path(p['doi'])}" for p in self._listed()
                     if self.faults.get(paper_path(p["doi"]), Fault("slow")).kind != "disallowed"]
            body = ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
                    "<urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n"
                    + "".join(f"<url><loc>{e(u)}</loc></url>\n" for u in locs) + "</urlset>\n")
            return 200, {"Content-Type": "application/xml; charset=utf-8"}, body.encode(), 0.0
        if path in ("/", "/papers/") or re.fullmatch(r"/papers/page/\d+/", path):
            n = 1 if path in ("/", "/papers/") else int(path.split("/")[3])
            items, pages = self._listed(), self.listing_pages()
            if n < 1 or n > pages:
                return 404, html_t, page_doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
            chunk = items[(n - 1) * self.per_page: n * self.per_page]
            nav = "".join(f"<a class=\"page-numbers\" href=\"/papers/page/{i}/\">{i}</a> " if i != n else
                          f"<span class=\"current\">{i}</span> " for i in range(1, pages + 1))
            if n < pages:
                nav += f"<a class=\"next\" href=\"/papers/page/{n + 1}/\">Older papers</a>"
            body = (f"<h1>Papers</h1>\n{''.join(listing_entry(p) for p in chunk)}<nav class=\"pagination\">"
                    f"{nav}</nav>\n")
            return 200, html_t, page_doc("Papers – Quantum", "", body).encode(), delay
        m = re.fullmatch(r"(/papers/q-\d{4}-\d{2}-\d{2}-\d+/)(pdf/)?", path)
        if m:
            with self._lock:
                p = self.papers.get(m.group(1))
            if p is None:
                return 404, html_t, page_doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
            if m.group(2):
                return 200, {"Content-Type": "application/pdf"}, b"%PDF-1.4\n% stub\n", 0.0
            return 200, html_t, render_paper(p).encode(), delay
        m = re.fullmatch(r"/arxiv/html/(.+)", path)
        if m:
            with self._lock:
                hit = [p for p in self.papers.values() if p["arxiv"] and p["arxiv"].removeprefix("arXiv:") == m.group(1)]
            if hit:
                body = (f"<article class=\"ltx_document\"><h1>{e(hit[0]['title'])}</h1><h6>Abstract</h6>"
                        f"<p>{e(hit[0]['abstract'])}</p><section><h2>1 Introduction</h2><p>Full text of "
                        f"{e(hit[0]['arxiv'])} (stand-in).</p></section></article>")
                return 200, html_t, page_doc(hit[0]["title"], "", body).encode(), 0.0
        return 404, html_t, page_doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0

    def record(self, host: str, path: str, status: int, ua: str) -> None:
        with self._lock:
            self.counts[path] += 1
            self.host_counts[host] += 1
            self.log.append((host, path, status))
            self.user_agents[ua] += 1

    @property
    def start_url(self) -> str:
        return f"{self.url}/papers/"


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "qrb-mirror/0.1"

        def do_GET(self) -> None:  # noqa: N802
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            path = urlsplit(self.path).path
            try:
                status, headers, body, delay = mirror.respond(host, path)
            except Exception:  # never kill the server thread
                log.exception("mirror: error serving %s", path)
                status, headers, body, delay = 500, {"Content-Type": "text/plain"}, b"mirror error\n", 0.0
            mirror.record(host, path, status, self.headers.get("User-Agent", ""))
            if delay:
                time.sleep(delay)
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (time-out)
                pass

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("mirror: " + fmt, *args)

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def serve_mirror(corpus_dir: str | Path, port: int = 0, faults: Iterable[Fault] | None = None,
                 host: str = "127.0.0.1", per_page: int = 5) -> Iterator[Mirror]:
    """Serve the mirror in a background thread; yields the `Mirror` (`.url`, `.counts`, `add_record`, ...)."""
    mirror = Mirror(load_corpus(corpus_dir), faults=faults, per_page=per_page)
    server = _Server((host, port), _handler(mirror))
    mirror.url = f"http://{host}:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="qrb-mirror", daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

