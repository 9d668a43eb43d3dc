"""An offline mirror of quantum-journal.org, built from the corpus snapshot (`data/corpus/*.jsonl`).

Serves, on 127.0.0.1 only, what the scrape stage crawls on the live site:

- `/papers/`, `/papers/page/2/`, ...: the paginated listing, newest first, `per_page` papers per page;
- `/papers/q-YYYY-MM-DD-N/`: one page per paper, with highwire `citation_*` meta tags in the head AND the visible
  blocks the real site shows (title; authors; numbered affiliations; "Published: YYYY-MM-DD, volume V, page P";
  "Eprint: arXiv:..."; "Doi: https://doi.org/..."; "Citation: Quantum V, P (YYYY)."; "Abstract" then the text;
  then BibTeX / References / Cited by stubs) and the CC BY 4.0 licence line;
- `/papers/q-.../pdf/` (a stub), `/robots.txt` (names the sitemap, disallows `/wp-admin/` and, with the
  `disallowed` fault, one paper path), `/sitemap.xml` (every listing and paper URL), and `/arxiv/html/<id>`
  (a stand-in for arXiv's HTML view, for the scraper's `full_text` option).

Records without a DOI are skipped (the page URL is the DOI suffix). Every page credits the source: papers in Quantum
are CC BY 4.0; the mirror's text is the snapshot's (several abstracts are arXiv preprint wordings) and says so.

The server counts requests per path (`.counts`) and per Host header (`.host_counts`: a redirect to `localhost`
counts there, so a test can prove that a crawler of `127.0.0.1` never followed it), and can inject bad cases
(`FAULT_KINDS`; `DEFAULT_FAULTS` is one of each). Papers can be added while it runs (`add_record`).

Python:

    from qrb.offline.mirror import serve_mirror, DEFAULT_FAULTS
    with serve_mirror("data/corpus", port=0, faults=DEFAULT_FAULTS) as m:
        m.url            # "http://127.0.0.1:<port>"
        m.start_url      # m.url + "/papers/"
        m.counts["/papers/q-2024-07-04-1397/"]
        m.add_record({...})   # a corpus-style record; appears on /papers/ at once

CLI (serves until killed; the demo flow uses port 8731, see profiles/tiny.yaml):

    python -m qrb.offline.mirror --corpus data/corpus --port 8731 [--faults]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import html
import json
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qrb.io import setup_logging

log = logging.getLogger(__name__)

DOI_RE = re.compile(r"^10\.22331/(q-(\d{4})-(\d{2})-(\d{2})-(\d+))$")
LICENSE_URL = "https://creativecommons.org/licenses/by/4.0/"
LICENSE_ID = "CC-BY-4.0"
CORPUS_FILES = ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")

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


def paper_id(doi: str) -> str:
    m = DOI_RE.match(doi or "")
    if not m:
        raise ValueError(f"mirror: not a Quantum DOI: {doi!r}")
    return m.group(1)


def paper_path(doi: str) -> str:
    return f"/papers/{paper_id(doi)}/"


def page_record(rec: dict[str, Any]) -> dict[str, Any]:
    """What the mirror's page for snapshot record `rec` shows, in the scraper's output schema.

    Equal to the snapshot's fields, with: `authors`/`affiliations` null -> [] (the page shows none);
    `published`/`volume`/`page` from the DOI when null; `citation` "Quantum V, P (YYYY)." when null (the real site
    always shows one); `license` "CC-BY-4.0"; `url` the live site's paper URL."""
    doi = rec["doi"]
    m = DOI_RE.match(doi or "")
    if not m:
        raise ValueError(f"mirror: record without a Quantum DOI: {rec.get('title')!r}")
    pid, y, mo, d, page = m.groups()
    published = rec.get("published") or f"{y}-{mo}-{d}"
    volume = str(rec.get("volume") or int(y) - 2016)
    page = str(rec.get("page") or page)
    return {
        "doi": doi,
        "url": f"https://quantum-journal.org/papers/{pid}/",
        "title": rec["title"],
        "authors": list(rec.get("authors") or []),
        "affiliations": list(rec.get("affiliations") or []),
        "published": published,
        "volume": volume,
        "page": page,
        "arxiv": rec.get("arxiv"),
        "citation": rec.get("citation") or f"Quantum {volume}, {page} ({published[:4]}).",
        "abstract": rec["abstract"],
        "license": LICENSE_ID,
    }


def load_corpus(corpus_dir: str | Path) -> list[dict[str, Any]]:
    """Snapshot records with a Quantum DOI (others are skipped: the page URL is the DOI suffix)."""
    corpus_dir = Path(corpus_dir)
    records: list[dict[str, Any]] = []
    files = [corpus_dir / f for f in CORPUS_FILES if (corpus_dir / f).exists()]
    if not files:
        raise FileNotFoundError(f"mirror: no {' or '.join(CORPUS_FILES)} in {corpus_dir}")
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if not DOI_RE.match(rec.get("doi") or ""):
                log.info("mirror: skipping record without a Quantum DOI: %s", rec.get("title"))
                continue
            records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------------- rendering
e = html.escape

_CREDIT = ("<footer><p class=\"credit\">Offline mirror of <a href=\"https://quantum-journal.org/\">Quantum</a>, the "
           "open journal for quantum science, built for tests from the quantum-research-bot corpus snapshot. Titles, "
           "authors, bibliographic data and abstracts are from papers published in Quantum under the "
           f"<a rel=\"license\" href=\"{LICENSE_URL}\">Creative Commons Attribution 4.0 International (CC BY 4.0)</a> "
           "license; some abstracts are arXiv preprint wordings and may differ from the published version. Cite the "
           "DOI of each paper.</p></footer>")


def _doc(title: str, head: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>\n"
            f"{head}</head>\n<body>\n<header><a href=\"/\">Quantum</a> <nav><a href=\"/papers/\">Papers</a> "
            f"<a href=\"/about/\">About</a> <a href=\"/wp-admin/\">Log in</a></nav></header>\n"
            f"<main>\n{body}</main>\n{_CREDIT}\n</body>\n</html>\n")


def render_paper(p: dict[str, Any], *, meta: bool = True, abstract: bool = True) -> str:
    """A paper page as the live site lays it out. `p` is a `page_record`."""
    pid = paper_id(p["doi"])
    head = ""
    if meta:
        tags = [("citation_title", p["title"])]
        tags += [("citation_author", a) for a in p["authors"]]
        tags += [("citation_publication_date", p["published"].replace("-", "/")),
                 ("citation_journal_title", "Quantum"), ("citation_issn", "2521-327X"),
                 ("citation_volume", p["volume"]), ("citation_firstpage", p["page"]),
                 ("citation_doi", p["doi"]), ("citation_pdf_url", f"/papers/{pid}/pdf/"),
                 ("DC.rights", LICENSE_URL)]
        head = "".join(f"<meta name=\"{n}\" content=\"{e(v)}\">\n" for n, v in tags)
    authors = ", ".join(f"<a href=\"/?s={e(a)}\">{e(a)}</a>" for a in p["authors"])
    affs = "".join(f"<li><sup>{e(m.group(1))}</sup>{e(m.group(2))}</li>" if (m := re.match(r"^(\d+)(\D.*)$", a))
                   else f"<li>{e(a)}</li>" for a in p["affiliations"])
    lines = [f"Published: {p['published']}, volume {p['volume']}, page {p['page']}"]
    if p["arxiv"]:
        arx = re.sub(r"^arXiv:", "", p["arxiv"])
        lines.append(f"Eprint: <a href=\"https://arxiv.org/abs/{e(arx)}\">{e(p['arxiv'])}</a>")
    lines.append(f"Doi: <a href=\"https://doi.org/{e(p['doi'])}\">https://doi.org/{e(p['doi'])}</a>")
    lines.append(f"Citation: {e(p['citation'])}")
    body = (f"<article>\n<h1 class=\"entry-title\">{e(p['title'])}</h1>\n"
            + (f"<p class=\"authors\">{authors}</p>\n" if p["authors"] else "")
            + (f"<ol class=\"affiliations\">{affs}</ol>\n" if p["affiliations"] else "")
            + "<table class=\"meta\">" + "".join(f"<tr><td>{ln}</td></tr>" for ln in lines) + "</table>\n"
            + f"<p><a href=\"/papers/{pid}/pdf/\">Get full text pdf</a></p>\n"
            + (f"<h2>Abstract</h2>\n<p>{e(p['abstract'])}</p>\n" if abstract else "")
            + f"<h2>BibTeX data</h2>\n<pre>@article{{{pid},\n  doi = {{{e(p['doi'])}}}\n}}</pre>\n"
            + "<h2>References</h2>\n<p>(not mirrored)</p>\n<h2>Cited by</h2>\n<p>(not mirrored)</p>\n"
            + f"<p class=\"license\">This Paper is published in Quantum under the <a rel=\"license\" "
              f"href=\"{LICENSE_URL}\">Creative Commons Attribution 4.0 International (CC BY 4.0)</a> license. "
              "Copyright remains with the original copyright holders such as the authors or their "
              "institutions.</p>\n</article>\n")
    return _doc(f"{p['title']} – Quantum", head, body)


def render_malformed(p: dict[str, Any]) -> str:
    # An unterminated attribute swallows the rest: nothing useful survives any HTML parser.
    return ("<html><head><meta name=\"citation_title\" content=\"" + e(p["title"]) + "\n<body><div <p "
            "Published: " + p["published"] + "<<<<&&&\x00</div></td></html")


def _listing_entry(p: dict[str, Any]) -> str:
    pid = paper_id(p["doi"])
    return (f"<div class=\"post\"><h2><a href=\"/papers/{pid}/\">{e(p['title'])}</a></h2>"
            f"<p>{e(', '.join(p['authors']))}</p><p>{e(p['citation'])} "
            f"<a href=\"https://doi.org/{e(p['doi'])}\">https://doi.org/{e(p['doi'])}</a> "
            f"<a href=\"/papers/{pid}/pdf/\">pdf</a></p></div>\n")


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
                return 404, html_t, _doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
            if fault.kind == "error_once":
                with self._lock:
                    first = path not in self._served_once
                    self._served_once.add(path)
                if first:
                    return 500, html_t, _doc("Error", "", "<h1>Internal Server Error</h1>\n").encode(), 0.0
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
                return 404, html_t, _doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
            chunk = items[(n - 1) * self.per_page: n * self.per_page]
            nav = "".join(f"<a class=\"page-numbers\" href=\"/papers/page/{i}/\">{i}</a> " if i != n else
                          f"<span class=\"current\">{i}</span> " for i in range(1, pages + 1))
            if n < pages:
                nav += f"<a class=\"next\" href=\"/papers/page/{n + 1}/\">Older papers</a>"
            body = (f"<h1>Papers</h1>\n{''.join(_listing_entry(p) for p in chunk)}<nav class=\"pagination\">"
                    f"{nav}</nav>\n")
            return 200, html_t, _doc("Papers – Quantum", "", body).encode(), delay
        m = re.fullmatch(r"(/papers/q-\d{4}-\d{2}-\d{2}-\d+/)(pdf/)?", path)
        if m:
            with self._lock:
                p = self.papers.get(m.group(1))
            if p is None:
                return 404, html_t, _doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0
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
                return 200, html_t, _doc(hit[0]["title"], "", body).encode(), 0.0
        return 404, html_t, _doc("Not found", "", "<h1>Page not found</h1>\n").encode(), 0.0

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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m qrb.offline.mirror", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="data/corpus", help="folder with the corpus snapshot (default data/corpus)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--per-page", type=int, default=5)
    ap.add_argument("--faults", action="store_true", help="inject one of each bad case (see FAULT_KINDS)")
    args = ap.parse_args(argv)
    setup_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with serve_mirror(args.corpus, port=args.port, host=args.host, per_page=args.per_page,
                          faults=DEFAULT_FAULTS if args.faults else None) as m:
            print(f"qrb.offline.mirror: serving {len(m.papers)} papers at {m.start_url} (Ctrl-C to stop)", flush=True)
            for kind, path in sorted(m.fault_paths().items()):
                print(f"qrb.offline.mirror: fault {kind}: {m.url}{path}", flush=True)
            while not stop.wait(0.5):
                pass
    except KeyboardInterrupt:
        pass
    except (OSError, FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"qrb.offline.mirror: {exc}") from None


if __name__ == "__main__":
    main()
