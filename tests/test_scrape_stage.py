"""End to end: `python -m stages.scrape` (the real spider, as a subprocess: Twisted's reactor runs once per process)
in a temp workspace, against the offline mirror with its bad cases; server-side request counts prove politeness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from qrb.schema import PAPER_KEYS
from stages.scrape import SECTION
from standins.mirror import DEFAULT_FAULTS, Fault, load_corpus, page_record, serve_mirror

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
SNAPSHOT = load_corpus(CORPUS)  # the 36 records with a DOI


def fast_params(start_url: str, **over) -> dict:
    """params.yaml's `scrape:` section, made fast for 127.0.0.1 (politeness mechanisms stay on)."""
    sc = yaml.safe_load((REPO / "params.yaml").read_text())["scrape"]
    sc.update(start_urls=[start_url], download_delay_s=0.0, autothrottle=True, autothrottle_start_delay_s=0.0,
              autothrottle_max_delay_s=0.5, concurrent_requests_per_domain=4, timeout_s=5, retry_times=2,
              max_pages=500)
    sc.update(over)
    return sc


def run_stage(ws: Path, scrape: dict) -> subprocess.CompletedProcess:
    ws.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load((REPO / "params.yaml").read_text())["base"]
    (ws / "params.yaml").write_text(yaml.safe_dump({"base": base, SECTION: scrape}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.scrape"], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=120)


def outputs(ws: Path) -> tuple[list[dict], list[dict], dict]:
    papers = [json.loads(x) for x in (ws / "artifacts/scrape/papers.jsonl").read_text().splitlines()]
    errors = [json.loads(x) for x in (ws / "artifacts/scrape/errors.jsonl").read_text().splitlines()]
    return papers, errors, json.loads((ws / "reports/scrape.json").read_text())


def in_window(rec: dict) -> bool:
    return "2024-07-01" <= rec["published"] <= "2024-12-31"


def paper_paths(counts) -> dict[str, int]:
    return {p: n for p, n in counts.items() if p.startswith("/papers/q-")}


def test_dvc_params_match_dataclass():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert dvc["stages"]["scrape"]["params"] == [SECTION]
    assert {"artifacts/scrape/papers.jsonl", "artifacts/scrape/errors.jsonl"} <= {
        o if isinstance(o, str) else next(iter(o)) for o in dvc["stages"]["scrape"]["outs"]}
    assert yaml.safe_load((REPO / "params.yaml").read_text())["scrape"]["start_urls"] == [
        "https://quantum-journal.org/papers/"]  # the default targets the live site; the mirror is a profile setting


def test_crawl_with_bad_cases(tmp_path):
    with serve_mirror(CORPUS, faults=DEFAULT_FAULTS) as m:
        r = run_stage(tmp_path, fast_params(m.start_url))
        assert r.returncode == 0, r.stderr[-3000:]
        papers, errors, metrics = outputs(tmp_path)
        fp = m.fault_paths()

        # every in-window paper, fields equal to the snapshot's
        expected = sorted((page_record(rec) for rec in SNAPSHOT if in_window(page_record(rec))),
                          key=lambda p: p["doi"])
        assert len(expected) == 33
        assert [p["doi"] for p in papers] == [e["doi"] for e in expected]
        snap = {rec["doi"]: rec for rec in SNAPSHOT}
        for got, exp in zip(papers, expected):
            assert list(got) == sorted(PAPER_KEYS)
            assert got["url"] == m.url + f"/papers/{exp['doi'].split('/')[1]}/"
            for k in PAPER_KEYS:
                if k != "url":
                    assert got[k] == exp[k], (got["doi"], k)
            s = snap[got["doi"]]
            for k in ("title", "abstract", "published", "volume", "page", "arxiv", "license"):
                assert got[k] == (s[k] if k != "license" else "CC-BY-4.0"), (got["doi"], k)
            assert got["authors"] == (s["authors"] or []) and got["affiliations"] == (s["affiliations"] or [])
            assert got["citation"] == (s["citation"] or f"Quantum {s['volume']}, {s['page']} ({s['published'][:4]}).")

        # each bad page is an error record with its reason
        by_url = {e["url"]: e["reason"] for e in errors}
        assert by_url == {
            m.url + fp["not_found"]: "http_404",
            m.url + fp["malformed"]: "malformed_html",
            m.url + fp["no_abstract"]: "missing_abstract",
            m.url + fp["offsite_redirect"]: "offsite_redirect",
            m.url + fp["disallowed"]: "robots_disallowed",
        }
        assert metrics["errors_by_reason"] == {"http_404": 1, "malformed_html": 1, "missing_abstract": 1,
                                               "offsite_redirect": 1, "robots_disallowed": 1}
        # the 500 was retried once and the paper kept; the slow page was kept
        assert m.counts[fp["error_once"]] == 2 and m.counts[fp["slow"]] == 1
        assert metrics["retries"] == 1

        # politeness, by the server's own counts
        assert set(m.host_counts) == {"127.0.0.1"}  # nothing followed the redirect to localhost
        assert m.counts[fp["disallowed"]] == 0 and m.counts["/wp-admin/"] == 0
        assert m.counts["/robots.txt"] == 1
        assert not [p for p in m.counts if p.endswith("/pdf/")]
        out_of_window = [p for p in m.papers if not in_window(m.papers[p])]
        assert len(out_of_window) == 3 and all(m.counts[p] == 0 for p in out_of_window)  # skipped unfetched
        assert all(n == 1 for p, n in paper_paths(m.counts).items() if p != fp["error_once"])  # no page twice
        assert set(m.user_agents) == {fast_params("x")["user_agent"]}

        assert metrics["papers_kept"] == 33 and metrics["papers_new"] == 33 and metrics["skipped_by_date"] == 3
        assert metrics["paper_pages_fetched"] == 33 + 2  # + malformed, no_abstract (the 404 goes to the errback)
        assert metrics["finish_reason"] == "finished" and metrics["page_cap_hit"] is False
        assert len((tmp_path / "cache/scrape/records.jsonl").read_text().splitlines()) == 33


def test_incremental_recrawl_and_byte_identical_output(tmp_path):
    with serve_mirror(CORPUS) as m:
        params = fast_params(m.start_url)
        a, b = tmp_path / "a", tmp_path / "b"
        assert run_stage(a, params).returncode == 0
        first = (a / "artifacts/scrape/papers.jsonl").read_bytes()
        assert sum(paper_paths(m.counts).values()) == 33

        # a fresh crawl of the same site in another workspace: byte-identical output
        assert run_stage(b, params).returncode == 0
        assert (b / "artifacts/scrape/papers.jsonl").read_bytes() == first

        # re-crawl with the cache, nothing new: zero paper pages fetched, same bytes (DVC deletes outs first)
        (a / "artifacts/scrape/papers.jsonl").unlink()
        m.counts.clear()
        r = run_stage(a, params)
        assert r.returncode == 0, r.stderr[-3000:]
        assert paper_paths(m.counts) == {}
        assert m.counts["/papers/"] == 1  # listing pages are fetched again to discover new papers
        assert (a / "artifacts/scrape/papers.jsonl").read_bytes() == first
        _, _, metrics = outputs(a)
        assert metrics["paper_pages_fetched"] == 0 and metrics["papers_from_cache"] == 33
        assert metrics["skipped_seen"] == 33

        # add 3 papers: exactly those 3 are fetched
        base = next(r for r in SNAPSHOT if r["doi"] == "10.22331/q-2024-12-27-1580")
        added = [m.add_record({**base, "doi": f"10.22331/q-2024-12-{28 + i}-{1610 + i}", "published": None, "page": None,
                               "citation": None, "title": f"A new paper {i}", "abstract": f"New abstract {i}."})
                 for i in range(3)]
        m.counts.clear()
        assert run_stage(a, params).returncode == 0
        assert paper_paths(m.counts) == {p: 1 for p in added}
        papers, _, metrics = outputs(a)
        assert len(papers) == 36 and metrics["papers_new"] == 3 and metrics["papers_from_cache"] == 33
        assert [p["doi"] for p in papers] == sorted(p["doi"] for p in papers)
        new = {p["doi"]: p for p in papers}["10.22331/q-2024-12-29-1611"]
        assert (new["title"], new["published"], new["page"]) == ("A new paper 1", "2024-12-29", "1611")
        assert new["citation"] == "Quantum 8, 1611 (2024)." and new["authors"] == base["authors"]


def test_full_text_from_the_arxiv_stand_in(tmp_path):
    with serve_mirror(CORPUS) as m:
        params = fast_params(m.start_url, full_text=True, full_text_url=m.url + "/arxiv/html/{arxiv_id}",
                             date_from="2024-07-01", date_to="2024-07-31")
        r = run_stage(tmp_path, params)
        assert r.returncode == 0, r.stderr[-3000:]
        papers, errors, metrics = outputs(tmp_path)
        assert errors == [] and len(papers) == 6
        with_arxiv = [p for p in papers if p["arxiv"]]
        assert len(with_arxiv) == 4 and metrics["full_text_fetched"] == 4
        for p in papers:
            if p["arxiv"]:
                assert p["full_text"].startswith(p["title"]) and p["abstract"][:80] in p["full_text"]
                assert m.counts["/arxiv/html/" + p["arxiv"].removeprefix("arXiv:")] == 1
            else:
                assert p["full_text"] is None


def test_timeout_is_retried_then_recorded(tmp_path):
    path = "/papers/q-2024-12-27-1580/"
    with serve_mirror(CORPUS, faults=[Fault("slow", path=path, delay_s=2.5)]) as m:
        r = run_stage(tmp_path, fast_params(m.start_url, timeout_s=1, retry_times=1, date_from="2024-12-23"))
        assert r.returncode == 0, r.stderr[-3000:]
        papers, errors, metrics = outputs(tmp_path)
        assert errors == [{"url": m.url + path, "reason": "timeout", "kind": "paper", "detail": errors[0]["detail"]}]
        assert m.counts[path] == 2 and metrics["retries"] == 1  # one retry (after a backoff), then given up
        assert [p["published"] for p in papers] == ["2024-12-23"]  # the window's other paper


def test_page_cap_stops_the_crawl(tmp_path):
    with serve_mirror(CORPUS) as m:
        r = run_stage(tmp_path, fast_params(m.start_url, max_pages=4, concurrent_requests_per_domain=1))
        assert r.returncode == 0, r.stderr[-3000:]
        _, errors, metrics = outputs(tmp_path)
        assert metrics["page_cap_hit"] is True
        assert sum(m.counts.values()) == 4  # a hard cap: queued requests are refused, not sent
        assert metrics["requests"] == 4
        assert {e["reason"] for e in errors} == {"page_cap"}  # the refused requests are recorded, not dropped


def test_bad_params_and_unreachable_site_fail_cleanly(tmp_path):
    r = run_stage(tmp_path / "p", fast_params("http://127.0.0.1:9/papers/", date_from="2025-01-01"))
    assert r.returncode != 0
    assert "scrape: params: `scrape.date_from`" in r.stderr and "Traceback" not in r.stderr
    r = run_stage(tmp_path / "u", fast_params("http://127.0.0.1:9/papers/", retry_times=0, timeout_s=2))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("scrape: could not fetch any start URL")
    assert "connection_refused" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "u" / "artifacts").exists()  # nothing written


def expected_dois() -> list[str]:
    return sorted(page_record(rec)["doi"] for rec in SNAPSHOT if in_window(page_record(rec)))


def test_discovers_a_listing_path_it_was_not_told_of(tmp_path):
    """The front page links the listing under /archive/, there is no sitemap: the spider follows in-site links."""
    with serve_mirror(CORPUS, faults=DEFAULT_FAULTS, layout="archive", sitemap=False) as m:
        r = run_stage(tmp_path, fast_params(m.start_url))
        assert r.returncode == 0, r.stderr[-3000:]
        papers, errors, metrics = outputs(tmp_path)
        assert [p["doi"] for p in papers] == expected_dois()
        assert all(p["url"] == m.url + f"/papers/{p['doi'].split('/')[1]}/" for p in papers)
        fp = m.fault_paths()
        assert {e["url"]: e["reason"] for e in errors} == {
            m.url + fp["not_found"]: "http_404", m.url + fp["malformed"]: "malformed_html",
            m.url + fp["no_abstract"]: "missing_abstract", m.url + fp["offsite_redirect"]: "offsite_redirect",
            m.url + fp["disallowed"]: "robots_disallowed"}
        # still polite: nothing offsite, nothing disallowed, no pdf, no paper page twice, out-of-window unfetched
        assert set(m.host_counts) == {"127.0.0.1"} and m.counts["/wp-admin/"] == 0 and m.counts[fp["disallowed"]] == 0
        assert not [p for p in m.counts if p.endswith("/pdf/")]
        assert all(n == 1 for p, n in paper_paths(m.counts).items() if p != fp["error_once"])
        assert all(m.counts[p] == 0 for p in m.papers if not in_window(m.papers[p]))
        # every listing page (+ /archive/page/1/, the same as /archive/), the front page; no sitemap
        assert metrics["listing_pages_fetched"] == m.listing_pages() + 1 and metrics["sitemaps_fetched"] == 0
        assert metrics["other_pages_fetched"] == 1 and m.counts["/"] == 1


def test_depth_bound_and_an_empty_crawl_is_an_error(tmp_path):
    """/ -> /issues/ (volumes, no paper) -> /issues/8/ (papers): two hops through pages without a paper link."""
    with serve_mirror(CORPUS, layout="issues", sitemap=False) as m:
        r = run_stage(tmp_path / "d2", fast_params(m.start_url, max_depth=2))
        assert r.returncode == 0, r.stderr[-3000:]
        assert [p["doi"] for p in outputs(tmp_path / "d2")[0]] == expected_dois()

        m.counts.clear()
        r = run_stage(tmp_path / "d1", fast_params(m.start_url, max_depth=1))
        assert r.returncode == 65, r.stderr[-3000:]  # DataError
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("scrape: no paper in the window 2024-07-01..2024-12-31") and "max_depth" in last
        assert "Traceback" not in r.stderr
        assert set(m.counts) == {"/robots.txt", "/", "/issues/", "/about/"}  # one hop, then it stopped
        assert not (tmp_path / "d1" / "artifacts").exists() and not (tmp_path / "d1" / "metrics").exists()
        assert not (tmp_path / "d1" / "cache/scrape/records.jsonl").exists()


def test_a_crawl_that_keeps_no_paper_fails_and_leaves_outputs_and_cache(tmp_path):
    with serve_mirror(CORPUS) as m:
        assert run_stage(tmp_path, fast_params(m.start_url)).returncode == 0
        # the outputs and the seen-set (the HTTP cache in cache/scrape/http/ keeps what it got, by design)
        files = [*(tmp_path / "artifacts").rglob("*.jsonl"), tmp_path / "reports/scrape.json",
                 tmp_path / "cache/scrape/records.jsonl", tmp_path / "cache/scrape/state.json"]
        before = {p: p.read_bytes() for p in files}
        assert len(before) == 5
        # the site answers, but no paper lies in the window
        r = run_stage(tmp_path, fast_params(m.start_url, date_from="2030-01-01", date_to="2030-12-31"))
        assert r.returncode == 65, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1].startswith("scrape: no paper in the window 2030-01-01..2030-12-31")
        assert {p: p.read_bytes() for p in files} == before


def _min_gap(times: list[tuple[float, str]]) -> float:
    t = sorted(x for x, _ in times)
    return min(b - a for a, b in zip(t, t[1:]))


def test_robots_crawl_delay_is_honoured(tmp_path):
    july = dict(date_from="2024-07-01", date_to="2024-07-31")  # 6 papers: a short crawl
    with serve_mirror(CORPUS) as m:  # the control: without Crawl-delay, requests come close together
        assert run_stage(tmp_path / "fast", fast_params(m.start_url, **july)).returncode == 0
        assert _min_gap(m.times) < 0.1
    with serve_mirror(CORPUS, crawl_delay=0.3) as m:
        r = run_stage(tmp_path / "slow", fast_params(m.start_url, **july))
        assert r.returncode == 0, r.stderr[-3000:]
        assert len(m.times) >= 15 and _min_gap(m.times) >= 0.3 * 0.95  # autothrottle and jitter stay above it
        assert outputs(tmp_path / "slow")[2]["crawl_delay_s"] == 0.3


def test_http_cache_saves_refetching(tmp_path):
    with serve_mirror(CORPUS) as m:
        params = fast_params(m.start_url)
        assert run_stage(tmp_path, params).returncode == 0
        first = (tmp_path / "artifacts/scrape/papers.jsonl").read_bytes()

        # again: listings, sitemap and robots.txt are revalidated (If-None-Match -> 304), the output is the same
        m.log.clear()
        assert run_stage(tmp_path, params).returncode == 0
        assert (tmp_path / "artifacts/scrape/papers.jsonl").read_bytes() == first
        assert m.log and all(status == 304 for _, _, status in m.log), m.log
        assert outputs(tmp_path)[2]["http_cache_revalidated"] == len(m.log)

        # full_text on: every paper is fetched again for its arXiv text, but its page comes from the HTTP cache
        m.counts.clear()
        r = run_stage(tmp_path, {**params, "full_text": True, "full_text_url": m.url + "/arxiv/html/{arxiv_id}"})
        assert r.returncode == 0, r.stderr[-3000:]
        papers, _, metrics = outputs(tmp_path)
        assert paper_paths(m.counts) == {}
        assert sum(1 for p in papers if p["arxiv"]) == sum(n for p, n in m.counts.items() if p.startswith("/arxiv/"))
        assert metrics["http_cache_hits"] >= 33 and metrics["paper_pages_fetched"] == 33
