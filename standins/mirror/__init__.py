"""An offline mirror of quantum-journal.org, built from the corpus snapshot (`data/corpus/*.jsonl`).

Serves, on 127.0.0.1 only, what the scrape stage crawls on the live site:

- `/papers/`, `/papers/page/2/`, ...: the paginated listing, newest first, `per_page` papers per page;
- `/papers/q-YYYY-MM-DD-N/`: one page per paper, with highwire `citation_*` meta tags in the head AND the visible
  blocks the real site shows (title, authors, numbered affiliations, "Published: ...", "Eprint: arXiv:...",
  "Doi: ...", "Citation: ...", "Abstract", BibTeX / References / Cited by stubs, the CC BY 4.0 licence line);
- `/papers/q-.../pdf/` (a stub), `/robots.txt`, `/sitemap.xml`, and `/arxiv/html/<id>` (a stand-in for arXiv's HTML
  view, for the scraper's `full_text` option).

Other sites can be played: the listing under `/archive/` or one page per volume under `/issues/V/` behind a front
page (`layout`), no sitemap, a `Crawl-delay:`. Every page carries an ETag and a `Cache-Control`, and a matching
`If-None-Match` gets 304. Records without a Quantum DOI are skipped (the page URL is the DOI suffix); every page
credits the source (CC BY 4.0; several abstracts are arXiv preprint wordings, and it says so).

The server counts requests per path (`.counts`) and per Host header (`.host_counts`: a crawler of `127.0.0.1` must
not follow a redirect to `localhost`), logs each one's status (`.log`) and arrival (`.times`), injects bad cases
(`FAULT_KINDS`; `DEFAULT_FAULTS` is one of each), and takes new papers while it runs (`add_record`):

    with serve_mirror("data/corpus", port=0, faults=DEFAULT_FAULTS) as m:
        m.start_url      # m.url + "/papers/" (the front page "/" in the other layouts)
        m.counts["/papers/q-2024-07-04-1397/"]

CLI (until killed; profiles/tiny.yaml names port 8731):
`python -m standins.mirror --corpus data/corpus --port 8731 [--faults] [--layout archive] [--no-sitemap]`
"""

from .server import DEFAULT_FAULTS, Fault, Mirror, serve_mirror
from .site import load_corpus, page_record, render_malformed, render_paper

__all__ = ["DEFAULT_FAULTS", "Fault", "Mirror", "load_corpus", "page_record", "render_malformed", "render_paper",
           "serve_mirror"]
