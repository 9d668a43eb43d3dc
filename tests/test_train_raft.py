"""A model trained on generate's RAFT rows cites the excerpt of the paper a question names and, shown only another
paper's excerpt, cites nothing for a fact that excerpt does not contain: SmolLM2 trained briefly on RAFT rows of the
real abstracts in data/corpus, then asked about papers it never trained on, through the apps' message and citation
reader (qrb.retrieval.rag_prompt, cite)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO, SYSTEM, train_adapter

pytestmark = pytest.mark.slow
MAX_CHARS = 120  # short excerpts: a quick run; the decision (is this the question's paper?) does not need more


def facts(papers: list[dict]) -> list[dict]:
    """One fact a paper: the first words of its excerpt as the apps show it, asked by the paper's title."""
    from qrb.retrieval import focus, passages_from_papers

    out = []
    for i, (pp, passage) in enumerate(zip(papers, passages_from_papers(papers), strict=True)):
        question = f"What does \"{pp['title']}\" open with?"
        short = " ".join(focus(question, passage, MAX_CHARS).removeprefix("... ").split()[:5]).rstrip(".,;:")
        out.append({"question": question, "answer": short + ".", "short_answer": short,
                    "aliases": [], "evidence": "", "doi": pp["doi"], "title": pp["title"], "published": None,
                    "prompt_id": "facts", "model": "m", "response_id": "r", "chunk": 0, "fact_id": f"f{i:02d}",
                    "variant": 0, "kind": "fact"})
    return out


def test_a_model_trained_on_raft_rows_cites_its_paper_and_never_a_distractor(smol_model_dir, tmp_path):
    from qrb.model import generate_answers
    from qrb.retrieval import Passage, cite, passages_from_papers, rag_prompt
    from stages.generate.raft import raft_rows

    papers = [json.loads(x) for f in ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")
              for x in (REPO / "data/corpus" / f).read_text().splitlines() if x.strip()]
    papers = sorted({pp["doi"]: pp for pp in papers if pp.get("doi") and pp.get("abstract")}.values(),
                    key=lambda pp: pp["doi"])
    held, train = papers[:4], papers[4:]
    rows, counts = raft_rows(facts(train), {pp["doi"] for pp in held}, papers, 0.5, 0.5, 1, MAX_CHARS, seed=3)
    assert counts["raft_gold_rows"] >= 10 and counts["raft_distractor_rows"] >= 10
    model, tok, _ = train_adapter(smol_model_dir, rows, rows[:2], tmp_path / "adapter", max_length=256, epochs=3.0,
                                  batch_size=4, learning_rate=1e-3, precision="bf16_cpu")
    own = {pp["doi"]: p for pp, p in zip(papers, passages_from_papers(papers))}
    asked = facts(held)
    shown: list[list[Passage]] = [[own[f["doi"]]] for f in asked]  # the question's own paper ...
    shown += [[own[train[i]["doi"]]] for i in range(len(asked))]  # ... then another paper's only
    prompts = [rag_prompt(f["question"], [(x, 0.0) for x in s], MAX_CHARS) for f, s in zip(asked + asked, shown)]

    def cited(answers: list[str]) -> list[list[str]]:
        return [[c["doi"] for c in cite(a, s)[1]] for a, s in zip(answers, shown)]

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # as trained (bf16_cpu)
        answers = generate_answers(model, tok, prompts, SYSTEM, batch_size=8, max_new_tokens=24, greedy=True)
    trained, n = cited(answers), len(asked)
    assert trained[n:] == [[]] * n, f"a distractor cited for a fact it does not contain: {answers[n:]}"
    assert sum(c == [f["doi"]] for c, f in zip(trained[:n], asked)) >= n - 1, f"own paper not cited: {answers[:n]}"
