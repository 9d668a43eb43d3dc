"""Parsing of quantum-journal.org paper pages (saved HTML strings; no crawl) and the stage's pure core."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from qrb.schema import PAPER_KEYS, ErrorItem, PaperItem
from stages.scrape import ScrapeParams
from stages.scrape.parse import norm, paper_id_from_url, parse_paper_html
from stages.scrape.run import assemble, seen_dois
from standins.mirror import load_corpus, page_record, render_malformed, render_paper

REPO = Path(__file__).resolve().parents[1]
URL = "https://quantum-journal.org/papers/q-2024-07-04-1397/"

META_PAGE = """<!DOCTYPE html><html><head>
<meta name="citation_title" content="The gauge theory of   measurement-based
  quantum computation &amp; its $\\mathbb{Z}_2$ limit">
<meta name="citation_author" content="Gabriel Wong">
<meta name="citation_author_institution" content="Fudan University">
<meta name="citation_author" content="Robert Raussendorf">
<meta name="citation_author_institution" content="Leibniz Universit&auml;t Hannover">
<meta name="citation_author" content="Bartłomiej Czech">
<meta name="citation_author_institution" content="Fudan University">
<meta name="citation_publication_date" content="2024/07/04">
<meta name="citation_journal_title" content="Quantum">
<meta name="citation_volume" content="8">
<meta name="citation_firstpage" content="1397">
<meta name="citation_doi" content="10.22331/q-2024-07-04-1397">
<link rel="license" href="https://creativecommons.org/licenses/by/4.0/">
</head><body><div class="wrap">
<h1>Some other heading the theme shows</h1>
<p>Eprint: <a href="https://arxiv.org/abs/2207.10098">arXiv:2207.10098v3</a></p>
<p>Citation: Quantum 8, 1397 (2024).</p>
<h3>Abstract</h3>
<p>Measurement-based quantum computation (MBQC) is a model where $a &lt; b$ and
   the  cluster state&#8217;s symmetry matters.</p>
<p>Second paragraph with \\(x^2\\).</p>
<h3>&#9658; BibTeX data</h3><pre>@article{...}</pre>
</div></body></html>"""

VISIBLE_PAGE = """<html><head><title>Efficient MPS representations – Quantum</title></head><body>
<div id="content"><article>
<h1 class="whatever-the-theme-calls-it">Efficient MPS representations and quantum circuits from the Fourier
 modes of classical image data</h1>
<div><span>Jobst, Bernhard</span><sup>1</sup>, <span>Shen, Kevin</span><sup>2</sup>, and
<span>Riofrío, Carlos A.</span><sup>1,2</sup></div>
<ul><li><sup>1</sup>Technical University of Munich</li><li><sup>2</sup>BMW Group, Munich</li></ul>
<table><tr><td>Published:</td><td>2024-12-03, volume 8, page 1544</td></tr>
<tr><td>Eprint:</td><td><a href="https://arxiv.org/abs/2311.07666">arXiv:2311.07666v2</a></td></tr>
<tr><td>Doi:</td><td><a href="https://doi.org/10.22331/q-2024-12-03-1544">https://doi.org/10.22331/q-2024-12-03-1544</a></td></tr>
<tr><td>Citation:</td><td>Quantum 8, 1544 (2024).</td></tr></table>
<h2>Abstract</h2>
<p>Machine learning tasks are an exciting application for quantum computers, as it has been proven that they can
learn certain problems with an exponential advantage over classical   approaches.</p>
<h2>Featured image from Efficient MPS</h2>
<p>This Paper is published in Quantum under the Creative Commons Attribution 4.0 International (CC BY 4.0)
license.</p>
</article></div></body></html>"""


def test_meta_tags_preferred_entities_decoded_latex_kept():
    item = parse_paper_html(META_PAGE, URL)
    assert isinstance(item, PaperItem), item
    assert item.title == "The gauge theory of measurement-based quantum computation & its $\\mathbb{Z}_2$ limit"
    assert item.authors == ["Gabriel Wong", "Robert Raussendorf", "Bartłomiej Czech"]
    assert item.affiliations == ["Fudan University", "Leibniz Universität Hannover"]  # deduplicated, in order
    assert (item.published, item.volume, item.page) == ("2024-07-04", "8", "1397")
    assert item.doi == "10.22331/q-2024-07-04-1397"
    assert item.arxiv == "arXiv:2207.10098v3"
    assert item.citation == "Quantum 8, 1397 (2024)."
    assert item.abstract == ("Measurement-based quantum computation (MBQC) is a model where $a < b$ and the cluster "
                             "state\u2019s symmetry matters. Second paragraph with \\(x^2\\).")
    assert item.license == "CC-BY-4.0"
    assert item.url == URL


def test_visible_text_only_page():
    url = "https://quantum-journal.org/papers/q-2024-12-03-1544/"
    item = parse_paper_html(VISIBLE_PAGE, url)
    assert isinstance(item, PaperItem), item
    assert item.title == ("Efficient MPS representations and quantum circuits from the Fourier modes of classical "
                          "image data")
    # one author per element: commas inside names survive
    assert item.authors == ["Jobst, Bernhard", "Shen, Kevin", "Riofrío, Carlos A."]
    assert item.affiliations == ["1Technical University of Munich", "2BMW Group, Munich"]
    assert (item.published, item.volume, item.page) == ("2024-12-03", "8", "1544")
    assert item.doi == "10.22331/q-2024-12-03-1544"
    assert item.arxiv == "arXiv:2311.07666v2"
    assert item.citation == "Quantum 8, 1544 (2024)."
    assert item.abstract.startswith("Machine learning tasks are an exciting application")
    assert item.abstract.endswith("over classical approaches.")  # stops at the next heading
    assert item.license == "CC-BY-4.0"


def test_visible_plain_author_list_and_doi_from_url():
    page = ("<html><body><h1>A title</h1><p>Ann Author, Bob Builder and Cy Coder</p>"
            "<p>Published: 2024-08-08, volume 8, page 1434</p><p><b>Abstract</b></p><p>Text.</p>"
            "<p>► References</p><p>[1] ref</p></body></html>")
    item = parse_paper_html(page, "http://127.0.0.1:1/papers/q-2024-08-08-1434/")
    assert isinstance(item, PaperItem), item
    assert item.authors == ["Ann Author", "Bob Builder", "Cy Coder"]
    assert item.doi == "10.22331/q-2024-08-08-1434"  # no Doi line: from the URL
    assert item.abstract == "Text."
    assert item.arxiv is None and item.citation is None and item.license is None


def test_tag_soup_is_recovered():
    page = ("<html><body><h1>Broken but readable<div><p>Published: 2024-10-23, volume 8, page 1504<p>"
            "<h2>Abstract<p>An abstract in <i>unclosed tags<p><h2>BibTeX data")
    item = parse_paper_html(page, "https://quantum-journal.org/papers/q-2024-10-23-1504/")
    assert isinstance(item, PaperItem), item
    assert item.abstract == "An abstract in unclosed tags"
    assert item.published == "2024-10-23"


@pytest.mark.parametrize("page,reason", [
    ("", "malformed_html"),
    ("\x00\x01\x02 garbage <<<", "malformed_html"),
    ("<html><body><h1>T</h1><p>Published: 2024-08-08, volume 8, page 1434</p></body></html>", "missing_abstract"),
    ("<html><body><p>Published: 2024-08-08, volume 8, page 1434</p><h2>Abstract</h2><p>x</p></body></html>",
     "missing_title"),
])
def test_bad_pages_become_error_records(page, reason):
    item = parse_paper_html(page, URL)
    assert isinstance(item, ErrorItem)
    assert item.reason == reason and item.url == URL and item.detail


def test_every_mirror_page_parses_to_the_snapshot_fields():
    """Both layouts of each real paper: with citation_* meta tags and visible text only."""
    records = load_corpus(REPO / "data" / "corpus")
    assert len(records) == 36  # 37 in the snapshot, one without DOI
    for rec in records:
        expected = page_record(rec)
        for meta in (True, False):
            item = parse_paper_html(render_paper(expected, meta=meta), expected["url"])
            assert isinstance(item, PaperItem), (rec["doi"], meta, item)
            got = item.record()
            assert got == {k: expected[k] for k in PAPER_KEYS}, (rec["doi"], meta)
            # and equal to the snapshot's own fields where it has them
            for k in ("doi", "title", "abstract", "published", "volume", "page", "arxiv"):
                assert got[k] == rec[k], (rec["doi"], k)
            assert got["authors"] == (rec["authors"] or [])
            assert got["affiliations"] == (rec["affiliations"] or [])
        bad = parse_paper_html(render_paper(expected, abstract=False), expected["url"])
        assert isinstance(bad, ErrorItem) and bad.reason == "missing_abstract"
        bad = parse_paper_html(render_malformed(expected), expected["url"])
        assert isinstance(bad, ErrorItem) and bad.reason == "malformed_html"


def test_paper_id_from_url():
    assert paper_id_from_url("https://quantum-journal.org/papers/q-2024-07-04-1397/") == (
        "q-2024-07-04-1397", dt.date(2024, 7, 4))
    assert paper_id_from_url("http://h/papers/q-2024-07-04-1397") == ("q-2024-07-04-1397", dt.date(2024, 7, 4))
    assert paper_id_from_url("https://quantum-journal.org/papers/q-2024-07-04-1397/pdf/") is None
    assert paper_id_from_url("https://quantum-journal.org/papers/q-2024-13-04-1397/") is None
    assert paper_id_from_url("https://quantum-journal.org/papers/page/2/") is None
    assert norm("  a \n\t b\xa0c ") == "a b c"


def _rec(doi: str, published: str, **kw):
    r = {k: None for k in PAPER_KEYS}
    r.update(doi=doi, url=f"u/{doi}", title="t", abstract="a", published=published, authors=[], affiliations=[])
    r.update(kw)
    return r


def test_assemble_merges_cache_sorts_dedups_and_filters_window():
    cache = {"10.22331/q-2024-08-01-2": _rec("10.22331/q-2024-08-01-2", "2024-08-01", title="old"),
             "10.22331/q-2023-01-01-1": _rec("10.22331/q-2023-01-01-1", "2023-01-01")}
    new = [_rec("10.22331/q-2024-08-01-2", "2024-08-01", title="new"),
           _rec("10.22331/q-2024-07-01-1", "2024-07-01", extra="dropped")]
    errors = [{"url": "b", "reason": "http_404"}, {"url": "a", "reason": "timeout"}, {"url": "b", "reason": "http_404"}]
    papers, errs, new_cache = assemble(cache, new, errors, dt.date(2024, 7, 1), dt.date(2024, 12, 31), False)
    assert [p["doi"] for p in papers] == ["10.22331/q-2024-07-01-1", "10.22331/q-2024-08-01-2"]
    assert papers[1]["title"] == "new"
    assert all(list(p) == list(PAPER_KEYS) for p in papers)  # exactly the schema keys
    assert errs == [{"url": "a", "reason": "timeout"}, {"url": "b", "reason": "http_404"}]
    assert set(new_cache) == {"10.22331/q-2023-01-01-1", "10.22331/q-2024-07-01-1", "10.22331/q-2024-08-01-2"}
    papers_ft, _, _ = assemble(cache, new, [], dt.date(2024, 7, 1), dt.date(2024, 12, 31), True)
    assert all(p["full_text"] is None for p in papers_ft)
    # with full_text on, a record cached without it is fetched again
    assert seen_dois({"x": {"doi": "x"}, "y": {"doi": "y", "full_text": None}}, True) == {"y"}
    assert seen_dois({"x": {"doi": "x"}}, False) == {"x"}


def test_params_check_names_the_key():
    ok = dict(start_urls=("https://quantum-journal.org/papers/",), date_from=dt.date(2024, 7, 1),
              date_to=dt.date(2024, 12, 31), max_pages=10, user_agent="qrb (+contact)", obey_robots=True,
              max_depth=2, max_discovery_pages=50, concurrent_requests_per_domain=1, download_delay_s=0.0,
              autothrottle=True,
              autothrottle_start_delay_s=0.0, autothrottle_max_delay_s=1.0, retry_times=1, timeout_s=5.0,
              full_text=False, full_text_url="https://arxiv.org/html/{arxiv_id}")
    ScrapeParams(**ok).check()
    for change, key in [({"date_from": dt.date(2025, 1, 1)}, "scrape.date_from"),
                        ({"start_urls": ("ftp://x/",)}, "scrape.start_urls"),
                        ({"start_urls": ()}, "scrape.start_urls"),
                        ({"max_pages": 0}, "scrape.max_pages"),
                        ({"max_depth": -1}, "scrape.max_depth"),
                        ({"max_discovery_pages": -1}, "scrape.max_discovery_pages"),
                        ({"full_text_url": "https://arxiv.org/html/"}, "scrape.full_text_url")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            dataclasses.replace(ScrapeParams(**ok), **change).check()


def test_label_and_value_in_separate_blocks():
    page = ("<html><body><h1>T</h1><dl><dt>Published</dt><dd>2024-08-08, volume 8, page 1434</dd>"
            "<dt>Eprint:</dt><dd>arXiv:2301.00001</dd><dt>Citation</dt><dd>Quantum 8, 1434 (2024).</dd></dl>"
            "<h2>Abstract</h2><p>x</p></body></html>")
    item = parse_paper_html(page, "https://quantum-journal.org/papers/q-2024-08-08-1434/")
    assert isinstance(item, PaperItem), item
    assert (item.published, item.volume, item.page) == ("2024-08-08", "8", "1434")
    assert item.arxiv == "arXiv:2301.00001" and item.citation == "Quantum 8, 1434 (2024)."
    assert item.authors == [] and item.affiliations == []


# -- the spider's discovery rules, on saved pages (no crawl) -------------------------------------------------------
SITE = "http://127.0.0.1:1"


def _spider(**over):
    from stages.scrape.spider import QuantumSpider

    ok = dict(start_urls=(SITE + "/",), date_from=dt.date(2024, 7, 1), date_to=dt.date(2024, 12, 31), max_pages=100,
              max_depth=2, max_discovery_pages=50, user_agent="qrb (+contact)", obey_robots=True,
              concurrent_requests_per_domain=1, download_delay_s=0.0, autothrottle=False,
              autothrottle_start_delay_s=0.0, autothrottle_max_delay_s=1.0, retry_times=0, timeout_s=5.0,
              full_text=False, full_text_url="https://arxiv.org/html/{arxiv_id}")
    ok.update(over)
    return QuantumSpider(params=ScrapeParams(**ok))


def _page(spider, path: str, html: str, hops: int = 0):
    from scrapy import Request
    from scrapy.http import HtmlResponse

    req = Request(SITE + path, meta={"qrb_hops": hops})
    out = list(spider.parse_page(HtmlResponse(SITE + path, body=html.encode(), encoding="utf-8", request=req)))
    return {r.url.removeprefix(SITE): r for r in out if hasattr(r, "url") and hasattr(r, "meta")}, out


def _html(*hrefs: str) -> str:
    return "<html><body>" + "".join(f'<a href="{h}">x</a>' for h in hrefs) + "</body></html>"


def test_a_listing_follows_its_own_section_and_its_papers_only():
    spider = _spider()
    reqs, _ = _page(spider, "/archive/", _html(
        "/papers/q-2024-08-01-1/", "/papers/q-2023-01-01-1/",  # in the window / outside it (never requested)
        "/papers/q-2024-08-01-1/pdf/", "/archive/page/2/", "/archive/page/2/#top",  # a PDF; pagination (once)
        "/about/", "/", "http://elsewhere.org/archive/x", "/wp-admin/"))  # menus, offsite, admin
    assert set(reqs) == {"/papers/q-2024-08-01-1/", "/archive/page/2/"}
    assert reqs["/papers/q-2024-08-01-1/"].meta["qrb_kind"] == "paper"
    assert reqs["/archive/page/2/"].meta["qrb_hops"] == 1  # a listing starts the hop count afresh
    assert spider.stats_local["listing_pages_fetched"] == 1 and spider.stats_local["skipped_by_date"] == 1
    # deep in a pagination chain, still followed
    reqs, _ = _page(spider, "/archive/page/40/", _html("/papers/q-2024-09-01-2/", "/archive/page/41/"), hops=1)
    assert set(reqs) == {"/papers/q-2024-09-01-2/", "/archive/page/41/"}


def test_pages_without_papers_are_hops_bounded_by_max_depth():
    spider = _spider(max_depth=2)
    reqs, _ = _page(spider, "/", _html("/issues/", "/about/", "https://other.org/"))
    assert set(reqs) == {"/issues/", "/about/"} and all(r.meta["qrb_hops"] == 1 for r in reqs.values())
    reqs, _ = _page(spider, "/issues/", _html("/issues/8/", "/about/"), hops=1)
    assert set(reqs) == {"/issues/8/"}  # /about/ was requested already
    reqs, _ = _page(spider, "/issues/8/", _html("/issues/8/part/2/"), hops=2)
    assert reqs == {}  # a third hop without a paper: max_depth=2 stops here
    assert spider.stats_local["other_pages_fetched"] == 3
    reqs, _ = _page(_spider(max_depth=0), "/", _html("/issues/", "/papers/q-2024-08-01-1/"))
    assert set(reqs) == {"/papers/q-2024-08-01-1/"}  # depth 0: only papers linked from the start URL


def test_discovery_cap_stops_following_links():
    spider = _spider(max_discovery_pages=2)
    reqs, _ = _page(spider, "/", _html("/a/", "/b/", "/c/", "/d/"))
    assert len(reqs) == 2 and spider.stats_local["discovery_cap_refused"] == 2


def test_a_paper_page_is_recognised_by_its_content_whatever_its_url():
    spider = _spider()
    _, out = _page(spider, "/?p=1397", META_PAGE)
    assert len(out) == 1 and isinstance(out[0], PaperItem)
    assert out[0].doi == "10.22331/q-2024-07-04-1397" and out[0].url == SITE + "/?p=1397"
    _, out = _page(spider, "/about/", _html("/contact/"))  # no citation_* tags: an ordinary page
    assert not [x for x in out if isinstance(x, PaperItem | ErrorItem)]
