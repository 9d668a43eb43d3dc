"""The evaluate core: every question set answered by every model, graded, scored, aggregated per set and freshness
split (each question dated by when its paper first became public).

Pure apart from the models it is handed (tests pass a tiny Llama, a fake retriever, a fake endpoint's env). Three
passes: every set answered by every model (rivals that fail anywhere are dropped everywhere); every answer graded
(offline, and by the LLM grader, once, for all answers with a gold); then scores and bootstrap aggregates.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qrb.grade import CORRECT, INCORRECT, NOT_ATTEMPTED, grade
from qrb.llm import Cache
from qrb.model import Gate, generate_answers, token_nll_rows
from qrb.retrieval import cite, ground
from qrb.schema import ABSTAIN_ANSWER
from qrb.sources import sourced

from . import EvaluateParams
from .metrics import Scorer, aggregate, paired_gains

log = logging.getLogger(__name__)

LOCAL_MODELS = ("base", "fine_tuned", "rag", "fine_tuned_rag")  # the tables' order; rivals follow
RAG_MODELS = ("rag", "fine_tuned_rag")
_DOI_DATE = re.compile(r"q-(\d{4})-(\d{2})-(\d{2})-\d+")
_ARXIV_NEW = re.compile(r"^(\d{2})(\d{2})\.\d{4,5}$")                    # 2306.08595 (since April 2007)
_ARXIV_OLD = re.compile(r"^[a-z-]+(?:\.[a-z]{2})?/(\d{2})(\d{2})\d{3}$")  # quant-ph/0601001 (before)
Row = dict[str, Any]  # a question (its set's row), or a per-question record


@dataclass(frozen=True)
class LocalModel:
    """The adapter model as every local row runs it: the same system prompt, batching and generation params."""

    model: Any
    tokenizer: Any
    system: str
    p: EvaluateParams
    max_length: int  # base.max_length: the one limit every eval CE counts within
    gate: Gate | None = None  # the adapter's confidence gate (qrb.model.read_gate): its closed-book answers only

    def answer(self, prompts: list[str], desc: str, refs: list[str] | None = None,
               gated: bool = False) -> tuple[list[str], list[Row]]:
        """The answers to `prompts` (`gated`: through the adapter's confidence gate), and per prompt (given `refs`)
        the summed NLL and token count of its reference."""
        p = self.p
        answers = generate_answers(self.model, self.tokenizer, prompts, self.system, batch_size=p.batch_size,
                                   max_new_tokens=p.max_new_tokens, greedy=p.greedy, desc=desc,
                                   gate=self.gate if gated else None) if prompts else []
        if refs is None:
            return answers, [{} for _ in answers]
        pairs = [{"question": q, "answer": a} for q, a in zip(prompts, refs)]
        nll = token_nll_rows(self.model, self.tokenizer, pairs, self.system, batch_size=p.batch_size,
                             max_length=self.max_length, desc=f"CE {desc}")
        return answers, [{"nll": a, "answer_tokens": b} for a, b in nll]


def local_answers(local: LocalModel, set_name: str, rows: Sequence[Row],
                  retrieval=None) -> tuple[dict[str, list[str]], dict[str, list[Row]]]:
    """The local rows of one set: base (adapter disabled), fine_tuned, and with `retrieval` (a Retriever and its
    `retrieval:` params, as qrb.retrieval.open_index returns them) rag and fine_tuned_rag: base and adapter given the
    apps' own user message (qrb.retrieval.ground), or the apps' abstention, unasked, where nothing reached min_score;
    an answer read from the passages stands where a passage it cites states it, and where none does an adapter with
    a gate gives its closed-book answer (the gate's), as the apps do (qrb.sources.sourced). Returns
    (answers, per-question extras: NLL and answer tokens; for the RAG rows the DOIs of the passages shown and of those
    the answer cites, qrb.retrieval.cite, whose answer without its [n] markers is what is graded) by model."""
    questions = [r["question"] for r in rows]
    refs = [r["answer"] for r in rows]
    grounded = ground(*retrieval, questions) if retrieval else []
    shown = [i for i, (prompt, _) in enumerate(grounded) if prompt is not None]
    answers: dict[str, list[str]] = {}
    extras: dict[str, list[Row]] = {}

    def rag(name: str, memory: Sequence[str] = ()) -> None:
        read = dict(zip(shown, local.answer([grounded[i][0] for i in shown], f"{set_name}/{name}")[0], strict=True))
        cited = [cite(sourced(read.get(i), (lambda i=i: memory[i]) if memory else None, passages), passages)
                 for i, (_, passages) in enumerate(grounded)]
        answers[name] = [text for text, _ in cited]
        extras[name] = [{"shown": [x.doi for x in passages], "cited": [c["doi"] for c in cites]}
                        for (_, passages), (_, cites) in zip(grounded, cited)]

    answers["fine_tuned"], extras["fine_tuned"] = local.answer(questions, f"{set_name}/fine_tuned", refs, gated=True)
    if grounded:  # what the excerpts state first; a gated adapter's memory where they state nothing (the apps' rule)
        rag("fine_tuned_rag", answers["fine_tuned"] if local.gate is not None else ())
    with local.model.disable_adapter():
        answers["base"], extras["base"] = local.answer(questions, f"{set_name}/base", refs)
        if grounded:
            rag("rag")
    order = [m for m in LOCAL_MODELS if m in answers]
    return {m: answers[m] for m in order}, {m: extras[m] for m in order}


def citation_columns(row: Row, shown: Sequence[str], cited: Sequence[str], g: str) -> dict[str, float | None]:
    """recall_at_k: the question's paper is among the passages shown; citation_accuracy, of an attempted answer: the
    first paper it cites is the question's (citing nothing is wrong). None without the row's DOI."""
    doi = (row.get("doi") or "").lower()
    cited = [c.lower() for c in cited]
    if not doi:
        return {"recall_at_k": None, "citation_accuracy": None}
    return {"recall_at_k": float(doi in [s.lower() for s in shown]),
            "citation_accuracy": None if g == NOT_ATTEMPTED else float(cited[:1] == [doi])}


def grade_columns(row: Row, g: str) -> Row:
    """A grade as the per-question columns aggregate averages: 1/0 per grade, hallucination 1/0 where attempted; a
    fact row without its gold is only attempted or not ("no_gold" when attempted), out of correct and incorrect (on
    a paper that does not exist declining is right: graded without a gold)."""
    if not (row.get("short_answer") or "").strip() and row.get("kind") != "abstain":
        return {"grade": "no_gold" if g != NOT_ATTEMPTED else g, "correct": None, "incorrect": None,
                "not_attempted": float(g == NOT_ATTEMPTED), "hallucination_rate": None}
    return {"grade": g, "correct": float(g == CORRECT), "incorrect": float(g == INCORRECT),
            "not_attempted": float(g == NOT_ATTEMPTED), "hallucination_rate": None if g == NOT_ATTEMPTED
            else float(g == INCORRECT)}


def apply_grader(p: EvaluateParams, answered: dict[str, tuple], graded: dict[str, dict], cache: Cache | None,
                 env) -> str | None:
    """Let the LLM grader grade every answer with a short gold answer, in every set (the offline grade is kept as
    grade_offline), but the apps' own abstention: not attempted, unasked. Returns the reason it was skipped (the
    offline grades then stand everywhere), or None."""
    from .judge import Item, llm_grades

    items, slots = [], []
    for set_name, (rows, answers, _) in answered.items():
        for name, preds in answers.items():
            for i, (r, pred) in enumerate(zip(rows, preds, strict=True)):
                if (r.get("short_answer") or "").strip() and pred != ABSTAIN_ANSWER:
                    items.append(Item(r["question"], r["short_answer"], tuple(r.get("aliases") or ()), pred))
                    slots.append((r, graded[set_name][name][i]))
    res = llm_grades(p.grader, items, cache, timeout_s=p.rival_timeout_s, max_retries=p.rival_max_retries,
                     concurrency=p.rival_concurrency, env=env)
    if res.grades is None:
        return res.skipped
    for (r, slot), g in zip(slots, res.grades, strict=True):
        slot.update(grade_columns(r, g), grade_offline=slot["grade"])
    log.info("grader %s: %d grades (%d requested, the rest cached)", p.grader.model, len(items), res.requests)
    return None


def score_set(scorer: Scorer, set_name: str, rows: Sequence[Row], answers: dict[str, list[str]],
              extras: dict[str, list[Row]], dates: Sequence[dt.date | None],
              cutoff: dt.date) -> tuple[dict[str, list[Row]], list[Row]]:
    """Per-question scores by model (extras merged in) and the prediction records of one set."""
    refs = [r["answer"] for r in rows]
    per_row: dict[str, list[Row]] = {}
    predictions: list[Row] = []
    for name, preds in answers.items():
        scored = scorer.rows(preds, refs)
        for s, ex in zip(scored, extras.get(name, [{}] * len(scored)), strict=True):
            s.update(ex)
        per_row[name] = scored
        for i, (r, pred, s) in enumerate(zip(rows, preds, scored, strict=True)):
            predictions.append({
                "set": set_name, "model": name, "id": r.get("id"), "doi": r.get("doi"),
                "paper_date": dates[i].isoformat() if dates[i] else None,
                "after_cutoff": None if dates[i] is None else dates[i] > cutoff,
                "question": r["question"], "reference": r["answer"], "short_answer": r.get("short_answer") or "",
                "prediction": pred,
                **{k: v for k, v in s.items() if k != "bleu_stats"}})
    return per_row, predictions


def set_metrics(per_row: dict[str, list[Row]], *, seed: int, samples: int, min_n: int) -> dict[str, Row]:
    """{model: metrics} of one set or freshness split; every model but base also has its paired gains against base."""
    out = {name: aggregate(rows, seed=seed, samples=samples, min_n=min_n) for name, rows in per_row.items()}
    for name, rows in per_row.items():
        if name != "base" and "base" in per_row:
            out[name].update(paired_gains(rows, per_row["base"], seed=seed, samples=samples, min_n=min_n))
    return out


def evaluate(base: dict[str, Any], p: EvaluateParams, model, tokenizer, sets: dict[str, list[Row]], *,
             papers: Sequence[Row] = (), retrieval=None, scorer: Scorer | None = None,
             grader_cache: Cache | None = None, gate: Gate | None = None,
             env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[Row], dict[str, str]]:
    """Answer every set with every model, grade and score them. Returns (metrics, predictions, skipped: reason by
    rival key and "grader").

    `retrieval` ((Retriever, RetrievalParams), as `qrb.retrieval.open_index` returns them) is needed for the RAG rows
    when `evaluate.rag` is on; `grader_cache` (the LLM grader's grades by key; None keeps none) gets each new grade;
    `gate`: the adapter's confidence gate, applied to its closed-book answers as the apps apply it.
    """
    from qrb.rivals import ask_rival

    if p.rag and retrieval is None:
        raise ValueError("evaluate: evaluate.rag needs the retrieval index (qrb.retrieval.open_index)")

    scorer = scorer or Scorer(p.bertscore_model, p.bertscore_num_layers)
    local = LocalModel(model, tokenizer, base["system_prompt"], p, base["max_length"], gate)
    skipped: dict[str, str] = {}
    answered: dict[str, tuple] = {}
    for set_name, rows in sets.items():
        if not rows:
            continue
        answers, extras = local_answers(local, set_name, rows, retrieval if p.rag else None)
        for rival in p.rivals:
            if rival.key in skipped:
                continue
            res = ask_rival(rival, [r["question"] for r in rows], local.system, max_tokens=p.max_new_tokens,
                            temperature=0.0 if p.greedy else 1.0, timeout_s=p.rival_timeout_s,
                            max_retries=p.rival_max_retries, concurrency=p.rival_concurrency, env=env)
            if res.skipped:
                skipped[rival.key] = res.skipped
            else:
                answers[rival.key] = res.answers or []
        answered[set_name] = (rows, answers, extras)
    for _, answers, _ in answered.values():  # a rival that failed on a later set is compared on none
        for key in skipped:
            answers.pop(key, None)

    graded = {s: {name: [grade_columns(r, grade(pred, r.get("short_answer") or "", r.get("aliases") or (),
                                                 r["question"])) for r, pred in zip(rows, preds, strict=True)]
                  for name, preds in answers.items()} for s, (rows, answers, _) in answered.items()}  # offline
    if p.grader is not None and answered:
        if reason := apply_grader(p, answered, graded, grader_cache, env):
            skipped["grader"] = reason

    models = [m for m in LOCAL_MODELS if m not in RAG_MODELS or p.rag]
    models += [r.key for r in p.rivals if r.key not in skipped]
    metrics: dict[str, Any] = {}
    predictions: list[Row] = []
    for set_name, rows in sets.items():
        if set_name not in answered:
            metrics[set_name] = {m: {"n": 0} for m in models}
            continue
        _, answers, extras = answered[set_name]
        for name, fr in graded[set_name].items():
            extras.setdefault(name, [{} for _ in rows])
            for r, ex, f in zip(rows, extras[name], fr, strict=True):
                ex.update(f, **(citation_columns(r, ex["shown"], ex["cited"], f["grade"]) if "cited" in ex else {}))
        subsets, dates = freshness_subsets(rows, p.knowledge_cutoff, papers)
        per_row, set_predictions = score_set(scorer, set_name, rows, answers, extras, dates, p.knowledge_cutoff)
        predictions += set_predictions
        kw = dict(seed=base["seed"], samples=p.bootstrap_samples, min_n=p.min_n_for_interval)
        metrics[set_name] = set_metrics(per_row, **kw)
        for sub, idx in subsets.items():  # each non-empty freshness split: `<set>_after_cutoff`...
            if idx:
                metrics[f"{set_name}_{sub}"] = set_metrics({m: [sr[i] for i in idx] for m, sr in per_row.items()}, **kw)
        for name, m in metrics[set_name].items():
            rates = ("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in ("correct", "not_attempted",
                                                                             "hallucination_rate"))
            log.info("%s/%s: correct %s not attempted %s hallucination rate %s (%.1f words)", set_name, name,
                     *rates, m["answer_words"])
    return metrics, predictions, skipped


# ---------------------------------------------------------------------------------------------------------------
# When a question's paper became public: the freshness split

def _arxiv_base(arxiv: str | None) -> str | None:
    if not arxiv:
        return None
    return re.sub(r"v\d+$", "", str(arxiv).strip().lower().removeprefix("arxiv:").strip())


def arxiv_v1_month(arxiv: str | None) -> dt.date | None:
    """The first day of the month the preprint's v1 appeared: an arXiv id's YYMM is its v1 month (new and old style
    ids); None for anything else."""
    base = _arxiv_base(arxiv)
    m = (_ARXIV_NEW.match(base) or _ARXIV_OLD.match(base)) if base else None
    if not m:
        return None
    yy, mm = int(m.group(1)), int(m.group(2))
    if not 1 <= mm <= 12:
        return None
    return dt.date((1900 if yy >= 91 else 2000) + yy, mm, 1)  # arXiv started in August 1991


def _iso(value: Any) -> dt.date | None:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except (TypeError, ValueError):
        return None


def paper_date(row: Row, papers: Sequence[Row] = ()) -> dt.date | None:
    """When the question's paper first became public: the earliest of its arXiv v1 month and its journal date.

    A journal date (the row's `published`, its paper's in papers.jsonl matched by DOI or arXiv id, else the DOI's
    q-YYYY-MM-DD) is often months after the preprint; the arXiv id (the row's or its paper's) dates v1 to the month.
    """
    doi = row.get("doi")
    arxiv = _arxiv_base(row.get("arxiv"))
    paper = next((p for p in papers if (doi and p.get("doi") == doi)
                  or (arxiv and _arxiv_base(p.get("arxiv")) == arxiv)), None)
    journal = _iso(row.get("published")) or (_iso(paper.get("published")) if paper else None)
    if journal is None and doi and (m := _DOI_DATE.search(str(doi))):
        journal = _iso("-".join(m.groups()))
    preprint = arxiv_v1_month(arxiv) or (arxiv_v1_month(paper.get("arxiv")) if paper else None)
    known = [d for d in (journal, preprint) if d is not None]
    return min(known) if known else None


def freshness_subsets(rows: Sequence[Row], cutoff: dt.date,
                      papers: Sequence[Row] = ()) -> tuple[dict[str, list[int]], list[dt.date | None]]:
    """Indices of the questions after / on-or-before the cutoff (undated ones are in neither), and the dates."""
    dates = [paper_date(r, papers) for r in rows]
    subsets = {"after_cutoff": [i for i, d in enumerate(dates) if d is not None and d > cutoff],
               "before_cutoff": [i for i, d in enumerate(dates) if d is not None and d <= cutoff]}
    return subsets, dates
