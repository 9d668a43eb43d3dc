"""Full text (`scrape.full_text`): generate sends the body in ~CHUNK_CHARS parts after the abstract (chunk 0),
without the body's copy of the abstract, and pairs come from beyond the abstract: on the mirror's arXiv stand-in
through the real scrape stage, and on a long body whose facts sit in its later parts."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from generate_helpers import ROOT, fake_papers, make_workspace, read, record, run_main

from stages.generate.units import CHUNK_CHARS, clean, paper_chunks
from standins.mirror import serve_mirror
from standins.smoke import serve_smoke_endpoint, split_sentences

FACT = "Our decoder eliminated 87.5% of the logical errors that the baseline decoder left uncorrected."


def long_body(paper: dict, paragraphs: int = 24) -> str:
    """A stand-in arXiv body (~30k characters): title, the abstract again (as arXiv HTML has it), sections of
    filler prose, and one result far into the text."""
    filler = ("The numerical method {i} uses a tensor network with bond dimension {d} and a lattice of {n} sites, "
              "whose boundary conditions are periodic in the horizontal direction and open in the vertical one. ")
    body = [paper["title"], "Abstract", paper["abstract"]]
    for i in range(paragraphs):
        body.append(f"{i + 1} Section {i + 1}")
        sentences = [filler.format(i=i * 10 + j, d=2 ** (j % 6 + 2), n=16 * (j + 1)) for j in range(5)]
        if i == paragraphs - 3:
            sentences.insert(2, FACT + " ")
        body.append("".join(sentences).strip())
    return "\n\n".join(body)


def test_chunks_skip_the_bodys_copy_of_the_abstract():
    paper = fake_papers()[0]
    chunks = paper_chunks({**paper, "full_text": long_body(paper)})
    assert chunks[0] == clean(paper["abstract"]) and len(chunks) >= 4
    assert all(len(c) <= CHUNK_CHARS + 1000 for c in chunks[1:])
    assert not any(s in c for c in chunks[1:] for s in split_sentences(paper["abstract"]))
    assert "Abstract" not in chunks[1].split()[:12] and FACT in chunks[-1]
    # a body with nothing but the title and the abstract adds no chunk
    only = f"{paper['title']}\n\nAbstract\n\n{paper['abstract']}"
    assert paper_chunks({**paper, "full_text": only}) == chunks[:1]


def test_a_fact_deep_in_the_body_becomes_a_pair(tmp_path, monkeypatch):
    papers = [{**p, "full_text": long_body(p)} for p in fake_papers()[:3]]
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=papers, eval_size=0, prompts=["results"])
        run_main(ws, monkeypatch)
        n_chunks = sum(len(paper_chunks(p)) for p in papers)
        assert ep.completions_count() == record(ws)["requests"] == n_chunks
    rows = read(ws / "artifacts/generate/train.jsonl")
    deep = [r for r in rows if r["answer"] == FACT]
    assert len(deep) == 3 and all(r["chunk"] == len(paper_chunks(papers[0])) - 1 > 1 for r in deep)


def test_full_text_scraped_from_the_mirror_yields_pairs_beyond_the_abstract(tmp_path, monkeypatch):
    """The real scrape stage with full_text on, against the mirror's /arxiv/html/<id> stand-in, then generate."""
    ws = tmp_path / "ws"
    ws.mkdir()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with serve_mirror(ROOT / "data" / "corpus") as m:
        scrape = {**params["scrape"], "start_urls": [m.start_url], "download_delay_s": 0.0,
                  "autothrottle_start_delay_s": 0.0, "autothrottle_max_delay_s": 0.5, "timeout_s": 5,
                  "retry_times": 2, "full_text": True, "full_text_url": m.url + "/arxiv/html/{arxiv_id}",
                  "date_from": "2024-07-01", "date_to": "2024-07-31"}
        (ws / "params.yaml").write_text(yaml.safe_dump({"base": params["base"], "scrape": scrape}))
        r = subprocess.run([sys.executable, "-m", "stages.scrape"], cwd=ws, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
    papers = read(ws / "artifacts/scrape/papers.jsonl")
    with_text = {p["doi"]: p for p in papers if p.get("full_text")}
    assert len(with_text) == 4 and len(papers) == 6
    with serve_smoke_endpoint(port=0) as ep:
        make_workspace(ws, ep.base_url, papers=papers, eval_size=0)
        run_main(ws, monkeypatch)
        # the abstract once per paper and template, the body once more for the 4 papers with full text
        n_templates = len(yaml.safe_load((ws / "params.yaml").read_text())["generate"]["prompts"])
        assert ep.completions_count() == (6 + 4) * n_templates
    rows = read(ws / "artifacts/generate/train.jsonl")
    beyond = [r for r in rows if r["chunk"] > 0]
    # from the body of most papers (a body pair whose question duplicates an abstract pair's is dropped, as ever)
    assert set(with_text) >= {r["doi"] for r in beyond} and len({r["doi"] for r in beyond}) >= 3
    for r in beyond:
        paper = with_text[r["doi"]]
        assert r["answer"] not in clean(paper["abstract"])
        assert r["answer"] in paper_chunks(paper)[r["chunk"]] and "Full text of arXiv" in r["answer"]
