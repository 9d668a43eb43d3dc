"""The offline quantum-journal.org mirror (standins.mirror): pages, robots/sitemap, request counts, injected faults."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from standins.mirror import DEFAULT_FAULTS, Fault, Mirror, load_corpus, page_record, serve_mirror

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **kw):  # noqa: ANN002, ANN003
        return None


def get(url: str | urllib.request.Request, follow: bool = True) -> tuple[int, dict, str]:
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def mirror():
    with serve_mirror(CORPUS, faults=DEFAULT_FAULTS) as m:
        yield m


def _snapshot() -> list[dict]:
    rows = []
    for name in ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl"):
        rows += [json.loads(line) for line in (CORPUS / name).read_text().splitlines() if line.strip()]
    return rows


def test_listing_paginates_every_paper_with_a_doi(mirror):
    snapshot = _snapshot()
    with_doi = {r["doi"] for r in snapshot if r["doi"]}
    assert len(snapshot) == 37 and len(with_doi) == 36
    linked: set[str] = set()
    status, _, html = get(mirror.start_url)
    n = 1
    while True:
        assert status == 200
        ids = re.findall(r'href="/papers/(q-[\d-]+)/"', html)
        assert 0 < len(ids) <= mirror.per_page
        linked |= set(ids)
        m = re.search(r'<a class="next" href="(/papers/page/\d+/)"', html)
        if not m:
            break
        status, _, html = get(mirror.url + m.group(1))
        n += 1
    assert n == mirror.listing_pages()
    assert {f"10.22331/{i}" for i in linked} == with_doi | {
        f"10.22331/{p.split('/')[2]}" for k, p in mirror.fault_paths().items() if k not in ("error_once", "slow")}
    assert get(mirror.url + f"/papers/page/{n + 1}/")[0] == 404


def test_paper_page_blocks_meta_and_credit(mirror):
    rec = next(r for r in load_corpus(CORPUS) if r["doi"] == "10.22331/q-2021-11-10-574")
    status, headers, html = get(mirror.url + "/papers/q-2021-11-10-574/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert '<meta name="citation_title" content="High-precision quantum algorithms for partial differential ' \
           'equations">' in html
    assert '<meta name="citation_doi" content="10.22331/q-2021-11-10-574">' in html
    assert "Published: 2021-11-10, volume 5, page 574" in html
    assert "arXiv:2002.07868v2" in html and "Eprint:" in html
    assert "Doi: <a href=\"https://doi.org/10.22331/q-2021-11-10-574\">" in html
    assert "Citation: Quantum 5, 574 (2021)." in html
    assert "<h2>Abstract</h2>" in html and rec["abstract"][:60] in html
    assert "<sup>1</sup>Joint Center for Quantum Information" in html
    assert "$\\mathrm{poly}(1/\\epsilon)$" in html  # LaTeX as written
    assert 'rel="license" href="https://creativecommons.org/licenses/by/4.0/"' in html
    assert "CC BY 4.0" in html and "corpus snapshot" in html  # attribution and provenance
    # a record without arXiv/citation still shows a citation line (derived, as the live site always has one)
    assert page_record({"doi": "10.22331/q-2024-07-04-1397", "title": "t", "abstract": "a"})["citation"] == \
        "Quantum 8, 1397 (2024)."


def test_robots_and_sitemap(mirror):
    _, _, robots = get(mirror.url + "/robots.txt")
    assert f"Sitemap: {mirror.url}/sitemap.xml" in robots
    assert "Disallow: /wp-admin/" in robots
    disallowed = mirror.fault_paths()["disallowed"]
    assert f"Disallow: {disallowed}" in robots
    status, _, sm = get(mirror.url + "/sitemap.xml")
    locs = re.findall(r"<loc>([^<]+)</loc>", sm)
    assert status == 200 and f"{mirror.url}/papers/" in locs
    assert f"{mirror.url}/papers/q-2024-12-27-1580/" in locs
    assert f"{mirror.url}{disallowed}" not in locs


def test_faults(mirror):
    fp = mirror.fault_paths()
    assert set(fp) == {f.kind for f in DEFAULT_FAULTS}
    assert get(mirror.url + fp["not_found"])[0] == 404
    before = mirror.counts[fp["error_once"]]
    assert get(mirror.url + fp["error_once"])[0] == 500
    assert get(mirror.url + fp["error_once"])[0] == 200  # succeeds on retry
    assert mirror.counts[fp["error_once"]] == before + 2
    t = time.monotonic()
    assert get(mirror.url + fp["slow"])[0] == 200
    assert time.monotonic() - t >= 0.9
    status, headers, _ = get(mirror.url + fp["offsite_redirect"], follow=False)
    assert status == 302 and headers["Location"].startswith("http://localhost:")
    _, _, html = get(mirror.url + fp["malformed"])
    assert "citation_title\" content=\"Synthetic" in html and "</html>" not in html
    _, _, html = get(mirror.url + fp["no_abstract"])
    assert "Published:" in html and "Abstract" not in html
    assert mirror.host_counts["127.0.0.1"] >= 7


def test_counts_and_add_record():
    with serve_mirror(CORPUS, per_page=4) as m:
        assert m.counts == {}
        get(m.url + "/papers/q-2024-12-27-1580/")
        get(m.url + "/papers/q-2024-12-27-1580/?x=1")
        assert m.counts["/papers/q-2024-12-27-1580/"] == 2  # per path, query ignored
        path = m.add_record({"doi": "10.22331/q-2025-01-02-1600", "title": "A paper added later",
                             "abstract": "Added while serving.", "authors": ["N. Ew"]})
        assert path == "/papers/q-2025-01-02-1600/"
        _, _, first = get(m.start_url)
        assert 'href="/papers/q-2025-01-02-1600/"' in first  # newest first
        _, _, page = get(m.url + path)
        assert "Published: 2025-01-02, volume 9, page 1600" in page and "Added while serving." in page
        assert m.log[-1] == ("127.0.0.1", path, 200)


def test_bad_fault_kind_rejected():
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault("teapot")
    with pytest.raises(ValueError, match="unknown layout"):
        Mirror([], layout="blog")


def _linked_papers(html: str) -> set[str]:
    return set(re.findall(r'href="/papers/(q-[\d-]+)/"', html))


@pytest.mark.parametrize("layout", ["archive", "issues"])
def test_other_layouts_list_every_paper_behind_a_front_page(layout):
    with serve_mirror(CORPUS, layout=layout, sitemap=False) as m:
        assert m.start_url == m.url + "/"
        _, _, front = get(m.start_url)
        assert not _linked_papers(front) and f'href="/{layout}/"' in front  # no paper on the front page
        assert get(m.url + "/papers/")[0] == 404  # the live site's listing path is not there
        assert get(m.url + "/sitemap.xml")[0] == 404 and "Sitemap:" not in get(m.url + "/robots.txt")[2]
        linked: set[str] = set()
        if layout == "archive":
            for i in range(1, m.listing_pages() + 1):
                status, _, html = get(m.url + (f"/archive/page/{i}/" if i > 1 else "/archive/"))
                assert status == 200 and 0 < len(_linked_papers(html)) <= m.per_page
                linked |= _linked_papers(html)
        else:
            _, _, index = get(m.url + "/issues/")
            vols = re.findall(r'href="/issues/(\d+)/"', index)
            assert not _linked_papers(index) and vols == sorted(vols, key=int, reverse=True) and len(vols) >= 2
            for v in vols:
                status, _, html = get(m.url + f"/issues/{v}/")
                assert status == 200 and f"volume {v}, page" not in html  # a listing, not paper pages
                ids = _linked_papers(html)
                assert ids and all(m.papers[f"/papers/{i}/"]["volume"] == v for i in ids)
                linked |= ids
            assert get(m.url + "/issues/99/")[0] == 404
        assert {f"/papers/{i}/" for i in linked} == set(m.papers)


def test_crawl_delay_etag_and_304():
    with serve_mirror(CORPUS, crawl_delay=0.25) as m:
        assert "Crawl-delay: 0.25\n" in get(m.url + "/robots.txt")[2]
        status, h, _ = get(m.start_url)
        assert status == 200 and h["Cache-Control"] == "no-cache" and h["ETag"].startswith('"')
        paper = "/papers/q-2024-12-27-1580/"
        status, hp, _ = get(m.url + paper)
        assert hp["Cache-Control"] == "max-age=86400" and hp["ETag"] != h["ETag"]
        req = urllib.request.Request(m.start_url, headers={"If-None-Match": h["ETag"]})
        assert get(req)[0] == 304 and m.log[-1] == ("127.0.0.1", "/papers/", 304)
        # a new paper changes the listing: the old ETag no longer matches
        m.add_record({"doi": "10.22331/q-2025-01-02-1600", "title": "New", "abstract": "A."})
        status, h2, _ = get(req)
        assert status == 200 and h2["ETag"] != h["ETag"]
        assert [p for _, p in m.times] == ["/robots.txt", "/papers/", paper, "/papers/", "/papers/"]
        assert all(a[0] <= b[0] for a, b in zip(m.times, m.times[1:]))  # arrival times, in order


def test_cli_serves_until_killed():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "standins.mirror", "--corpus", str(CORPUS), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for _ in range(20):  # log lines (e.g. the skipped no-DOI record) come first
            line = proc.stdout.readline()
            if "serving" in line or not line:
                break
        assert f"http://127.0.0.1:{port}/papers/" in line and "36 papers" in line
        assert get(f"http://127.0.0.1:{port}/robots.txt")[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert proc.returncode == 0
