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

Other sites can be played (`layout`, `sitemap`, `crawl_delay`): the listing under `/archive/` or as one page per
volume under `/issues/V/`, behind a front page `/` that shows no paper (`LAYOUTS`); no sitemap; a `Crawl-delay:` line
in robots.txt. Every page carries an ETag and a `Cache-Control` (papers: max-age of a day; listings, sitemap,
robots.txt: revalidate) and a matching `If-None-Match` gets 304, so HTTP caching can be tested.

Records without a DOI are skipped (the page URL is the DOI suffix). Every page credits the source: papers in Quantum
are CC BY 4.0; the mirror's text is the snapshot's (several abstracts are arXiv preprint wordings) and says so.

The server counts requests per path (`.counts`) and per Host header (`.host_counts`: a redirect to `localhost`
counts there, so a test can prove that a crawler of `127.0.0.1` never followed it), logs each one's status (`.log`)
and arrival time (`.times`), and can inject bad cases
(`FAULT_KINDS`; `DEFAULT_FAULTS` is one of each). Papers can be added while it runs (`add_record`).

Python:

    from standins.mirror import serve_mirror, DEFAULT_FAULTS
    with serve_mirror("data/corpus", port=0, faults=DEFAULT_FAULTS) as m:
        m.url            # "http://127.0.0.1:<port>"
        m.start_url      # m.url + "/papers/" (the front page "/" in the other layouts)
        m.counts["/papers/q-2024-07-04-1397/"]
        m.add_record({...})   # a corpus-style record; appears on /papers/ at once

CLI (serves until killed; the demo flow uses port 8731, see profiles/tiny.yaml):

    python -m standins.mirror --corpus data/corpus --port 8731 [--faults] [--layout archive] [--no-sitemap]
                                 [--crawl-delay 1.5]

Layout: `site` (corpus loading, page records, HTML rendering; pure), `faults` (the bad cases), `server` (the
`Mirror` state, the HTTP handler, `serve_mirror`), `__main__` (the CLI).
"""

from .faults import DEFAULT_FAULTS, FAULT_KINDS, Fault
from .server import Mirror, serve_mirror
from .site import (
    CORPUS_FILES,
    DOI_RE,
    LAYOUTS,
    LICENSE_ID,
    LICENSE_URL,
    load_corpus,
    page_record,
    paper_id,
    paper_path,
    render_malformed,
    render_paper,
)

__all__ = ["CORPUS_FILES", "DEFAULT_FAULTS", "DOI_RE", "FAULT_KINDS", "LAYOUTS", "LICENSE_ID", "LICENSE_URL", "Fault",
           "Mirror", "load_corpus", "page_record", "paper_id", "paper_path", "render_malformed", "render_paper",
           "serve_mirror"]
