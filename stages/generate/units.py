"""The requests to make: one `Unit` per (paper, chunk, template), its cache key, and what the run will cost.

Pure: papers + templates + params in, units (and the papers that cannot be sent, as failure rows) out. The
fact-level requests (augment, paraphrase) are built by `facts` from the same `Unit`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

from qrb import llm

from . import GenerateParams

CHUNK_CHARS = 8000              # full text (when the scrape stage fetched it) is sent in chunks of about this size
EST_OUTPUT_TOKENS_PER_PAIR = 90  # for the cost estimate: a pair is ~60-120 tokens of JSON


@dataclasses.dataclass
class Unit:
    doi: str
    title: str
    published: str | None
    prompt_id: str
    chunk: int
    messages: list[dict[str, str]]
    key: str                  # cache key
    est_prompt_tokens: int
    est_completion_tokens: int
    fact_id: str | None = None  # the fact an augment or paraphrase request is about (None: a QA request)


def failure_row(doi: str | None, title: str, reason: str, *, prompt_id: str | None = None, chunk: int | None = None,
                attempts: int = 0, fact_id: str | None = None) -> dict[str, Any]:
    """A failures.jsonl row; a paper-level failure (no request sent) has no prompt_id, no chunk, 0 attempts; only an
    augment or paraphrase request has a fact_id."""
    return {"doi": doi, "title": title, "prompt_id": prompt_id, "chunk": chunk, "fact_id": fact_id,
            "attempts": attempts, "reason": reason}


def unit_failure(unit: Unit, reason: str, attempts: int) -> dict[str, Any]:
    return failure_row(unit.doi, unit.title, reason, prompt_id=unit.prompt_id, chunk=unit.chunk, attempts=attempts,
                       fact_id=unit.fact_id)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_unit(of: dict[str, Any], prompt_id: str, placeholder: str, block: str, template: str, system: str,
              p: GenerateParams, seed: int, n: int) -> Unit:
    """The request asking `n` pairs of `block` (a paper's chunk, or a fact: put at `placeholder` in the template);
    `of`: its doi, title, published, chunk and fact_id. Its cache key holds what the reply depends on: endpoint,
    model, the template (with the system prompt), the block, sampling."""
    sampling = {"temperature": p.temperature, "max_tokens": p.max_tokens, "n_pairs": n, "seed": seed}
    key = _hash(json.dumps({"endpoint": p.base_url.rstrip("/"), "model": p.model,
                            "template": _hash(system + "\x00" + template), "paper": _hash(block),
                            "sampling": sampling}, sort_keys=True))
    user = template.replace("{{n}}", str(n)).replace(placeholder, block)
    return Unit(doi=of["doi"], title=of["title"], published=of["published"], prompt_id=prompt_id, chunk=of["chunk"],
                key=key, est_prompt_tokens=llm.count(system + user, p.model) + 8,
                est_completion_tokens=min(p.max_tokens, n * EST_OUTPUT_TOKENS_PER_PAIR + 20),
                fact_id=of.get("fact_id"),
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])


_DELIM = re.compile(r"<\s*/?\s*paper\s*>", re.I)


def clean(text: Any) -> str:
    """One line of text that cannot open or close a `<paper>` block."""
    return _DELIM.sub("[paper]", " ".join(str(text or "").split()))


def body_paragraphs(full: str, abstract: str) -> list[str]:
    """The full text's paragraphs less its copy of the abstract (chunk 0 already sends it: sent again, it would cost
    a request per template and only yield duplicate questions), and the heading that opens it."""
    abstract = clean(abstract)
    paras = [p for p in re.split(r"\n\s*\n", full) if p.strip()]
    out = []
    for para in paras:
        text = clean(para)
        if abstract and len(text) >= 40 and text in abstract:
            if out and clean(out[-1]).lower().rstrip(":.") == "abstract":
                out.pop()
            continue
        out.append(para)
    return out


def paper_chunks(paper: dict[str, Any]) -> list[str]:
    """The texts sent for a paper: chunk 0 is the abstract; full text (if scraped) follows in ~CHUNK_CHARS pieces,
    without the abstract; a full text with nothing but the title and the abstract adds no chunk."""
    chunks = [clean(paper.get("abstract"))] if (paper.get("abstract") or "").strip() else []
    full = paper.get("full_text")
    if isinstance(full, str) and full.strip():
        paras, cur = body_paragraphs(full, paper.get("abstract") or ""), ""
        if all(clean(p) == clean(paper.get("title")) for p in paras):
            paras = []
        for para in paras:
            if cur and len(cur) + len(para) > CHUNK_CHARS:
                chunks.append(clean(cur))
                cur = ""
            cur += para + "\n\n"
        if cur.strip():
            chunks.append(clean(cur))
    return chunks


def block_head(title: Any, doi: Any, published: Any) -> list[str]:
    """The opening lines of a `<paper>` block (a paper, or a fact of one)."""
    return ["<paper>", f"Title: {clean(title)}", f"DOI: {clean(doi)}"] + ([f"Published: {clean(published)}"]
                                                                        if published else [])


def render_paper(paper: dict[str, Any], chunk: int, text: str, n_chunks: int) -> str:
    lines = block_head(paper.get("title"), paper.get("doi"), paper.get("published"))
    if chunk:
        lines.append(f"Part: {chunk} of {n_chunks - 1} of the full text")
    lines += ["Text:" if chunk else "Abstract:", text, "</paper>"]
    return "\n".join(lines)


def build_units(papers: list[dict[str, Any]], templates: dict[str, str], system: str, p: GenerateParams,
                seed: int) -> tuple[list[Unit], list[dict[str, Any]]]:
    """Every request to make, and the papers that cannot be sent (as failure rows)."""
    units, failures = [], []
    for paper in papers:
        doi, title = paper.get("doi"), clean(paper.get("title"))
        if not doi:
            failures.append(failure_row(doi, title, f"paper has no DOI ({paper.get('url')})"))
            continue
        chunks = paper_chunks(paper)
        if not chunks:
            failures.append(failure_row(doi, title, "paper has no abstract or text"))
            continue
        for ci, text in enumerate(chunks):
            block = render_paper(paper, ci, text, len(chunks))
            of = {"doi": doi, "title": title, "published": paper.get("published"), "chunk": ci}
            asked = p.facts_asked if ci == 0 else p.pairs_per_prompt  # reading practice is over the abstract only
            units += [make_unit(of, pid, "{{paper}}", block, templates[pid], system, p, seed, asked)
                      for pid in p.prompts]
    return units, failures


def cost_usd(prompt_tokens: int, completion_tokens: int, p: GenerateParams, factor: float = 1.0) -> float:
    """At the online prices; `factor` = `batch_price_factor` for what a batch answers."""
    return factor * (prompt_tokens * p.price_input_per_1m / 1e6 + completion_tokens * p.price_output_per_1m / 1e6)


def reply_cost(value: dict[str, Any], p: GenerateParams) -> float:
    """What a cached reply cost: a batch's (`value["batch"]`) at `batch_price_factor`."""
    return cost_usd(value["prompt_tokens"], value["completion_tokens"], p,
                    p.batch_price_factor if value.get("batch") else 1.0)


def estimate(units: list[Unit], cached: set[str], p: GenerateParams) -> dict[str, Any]:
    """Requests (cached / to send) and their estimated cost, before anything is sent."""
    todo = [u for u in units if u.key not in cached]
    return priced(len(units), len(todo), sum(u.est_prompt_tokens for u in todo),
                  sum(u.est_completion_tokens for u in todo), p)


def priced(n: int, n_todo: int, prompt_tokens: int, completion_tokens: int, p: GenerateParams) -> dict[str, Any]:
    """An estimate's record: the tokens of the `n_todo` requests to send priced at the mode's price (batch mode: the
    Batch API's), and at worst (every reply `max_tokens` long)."""
    factor = p.batch_price_factor if p.mode == "batch" else 1.0
    return {"requests": n, "requests_cached": n - n_todo, "requests_to_send": n_todo,
            "est_prompt_tokens": prompt_tokens, "est_completion_tokens": completion_tokens,
            "est_cost_usd": round(cost_usd(prompt_tokens, completion_tokens, p, factor), 6),
            "worst_case_cost_usd": round(cost_usd(prompt_tokens, n_todo * p.max_tokens, p, factor), 6)}
