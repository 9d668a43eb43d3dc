"""The mirror's site, pure: snapshot records -> page records -> the HTML the live site shows (no server here)."""

from __future__ import annotations

import html
import logging
import re
from pathlib import Path
from typing import Any

from qrb.io import read_jsonl

log = logging.getLogger(__name__)

DOI_RE = re.compile(r"^10\.22331/(q-(\d{4})-(\d{2})-(\d{2})-(\d+))$")
LICENSE_URL = "https://creativecommons.org/licenses/by/4.0/"
LICENSE_ID = "CC-BY-4.0"
CORPUS_FILES = ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")
LAYOUTS = {  # layout -> the root of its paper listing
    "papers": "/papers/",    # the live site's: `/` and `/papers/` are listing page 1, then `/papers/page/N/`
    "archive": "/archive/",  # `/` a front page linking `/archive/`, then `/archive/page/N/`
    "issues": "/issues/",    # `/` a front page linking `/issues/` (volumes, no paper), one page per volume `/issues/V/`
}


def paper_id(doi: str) -> str:
    if not (m := DOI_RE.match(doi or "")):
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
    if not (m := DOI_RE.match(doi or "")):
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
    files = [Path(corpus_dir) / f for f in CORPUS_FILES if (Path(corpus_dir) / f).exists()]
    if not files:
        raise FileNotFoundError(f"mirror: no {' or '.join(CORPUS_FILES)} in {corpus_dir}")
    records = [rec for f in files for rec in read_jsonl(f)]
    for rec in records:
        if not DOI_RE.match(rec.get("doi") or ""):
            log.info("mirror: skipping record without a Quantum DOI: %s", rec.get("title"))
    return [rec for rec in records if DOI_RE.match(rec.get("doi") or "")]


# ----------------------------------------------------------------------------------------------------- rendering
e = html.escape

_CREDIT = ("<footer><p class=\"credit\">Offline mirror of <a href=\"https://quantum-journal.org/\">Quantum</a>, the "
           "open journal for quantum science, built for tests from the quantum-research-bot corpus snapshot. Titles, "
           "authors, bibliographic data and abstracts are from papers published in Quantum under the "
           f"<a rel=\"license\" href=\"{LICENSE_URL}\">Creative Commons Attribution 4.0 International (CC BY 4.0)</a> "
           "license; some abstracts are arXiv preprint wordings and may differ from the published version. Cite the "
           "DOI of each paper.</p></footer>")


def page_doc(title: str, head: str, body: str, nav: str = "/papers/") -> str:
    """A whole page: the header links the front page, the paper listing (`nav`), About and the admin login."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>\n"
            f"{head}</head>\n<body>\n<header><a href=\"/\">Quantum</a> <nav><a href=\"{nav}\">Papers</a> "
            f"<a href=\"/about/\">About</a> <a href=\"/wp-admin/\">Log in</a></nav></header>\n"
            f"<main>\n{body}</main>\n{_CREDIT}\n</body>\n</html>\n")


def render_paper(p: dict[str, Any], *, meta: bool = True, abstract: bool = True, nav: str = "/papers/") -> str:
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
    return page_doc(f"{p['title']} – Quantum", head, body, nav)


def render_malformed(p: dict[str, Any]) -> str:
    # An unterminated attribute swallows the rest: nothing useful survives any HTML parser.
    return ("<html><head><meta name=\"citation_title\" content=\"" + e(p["title"]) + "\n<body><div <p "
            "Published: " + p["published"] + "<<<<&&&\x00</div></td></html")


def listing_entry(p: dict[str, Any]) -> str:
    pid = paper_id(p["doi"])
    return (f"<div class=\"post\"><h2><a href=\"/papers/{pid}/\">{e(p['title'])}</a></h2>"
            f"<p>{e(', '.join(p['authors']))}</p><p>{e(p['citation'])} "
            f"<a href=\"https://doi.org/{e(p['doi'])}\">https://doi.org/{e(p['doi'])}</a> "
            f"<a href=\"/papers/{pid}/pdf/\">pdf</a></p></div>\n")


def render_listing(chunk: list[dict[str, Any]], n: int, pages: int, base: str, nav: str) -> str:
    """Listing page `n` of `pages` (`chunk` = its papers); page i lives at `{base}page/{i}/`."""
    links = "".join(f"<a class=\"page-numbers\" href=\"{base}page/{i}/\">{i}</a> " if i != n else
                    f"<span class=\"current\">{i}</span> " for i in range(1, pages + 1))
    if n < pages:
        links += f"<a class=\"next\" href=\"{base}page/{n + 1}/\">Older papers</a>"
    body = (f"<h1>Papers</h1>\n{''.join(listing_entry(p) for p in chunk)}<nav class=\"pagination\">"
            f"{links}</nav>\n")
    return page_doc("Papers – Quantum", "", body, nav)


def render_front(nav: str) -> str:
    """A front page that shows no paper, only a link to where the listing lives."""
    body = ("<h1>Quantum</h1>\n<p>The open journal for quantum science.</p>\n"
            f"<p><a href=\"{nav}\">Browse the published papers</a> · <a href=\"/about/\">About the journal</a></p>\n")
    return page_doc("Quantum – the open journal for quantum science", "", body, nav)


def render_volumes(volumes: list[tuple[str, str]], nav: str) -> str:
    """An index of volumes, (volume, year) newest first, each linking `/issues/V/`; no paper on it."""
    items = "".join(f"<li><a href=\"/issues/{e(v)}/\">Volume {e(v)} ({e(y)})</a></li>" for v, y in volumes)
    return page_doc("Issues – Quantum", "", f"<h1>Issues</h1>\n<ul class=\"volumes\">{items}</ul>\n", nav)


def render_volume(v: str, papers: list[dict[str, Any]], nav: str) -> str:
    body = f"<h1>Volume {e(v)}</h1>\n{''.join(listing_entry(p) for p in papers)}"
    return page_doc(f"Volume {v} – Quantum", "", body, nav)


def render_robots(disallowed: list[str], sitemap_url: str | None, crawl_delay: float | None) -> str:
    body = "User-agent: *\n" + "".join(f"Disallow: {d}\n" for d in disallowed)
    if crawl_delay is not None:
        body += f"Crawl-delay: {crawl_delay:g}\n"
    return body + (f"\nSitemap: {sitemap_url}\n" if sitemap_url else "")


def render_sitemap(urls: list[str]) -> str:
    return ("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<urlset xmlns=\"http://www.sitemaps.org/schemas/sitemap/0.9\">\n"
            + "".join(f"<url><loc>{e(u)}</loc></url>\n" for u in urls) + "</urlset>\n")
