"""The evaluate core: every question set answered by every model, scored, aggregated per set and freshness split.

Pure apart from the models it is handed (tests pass a tiny Llama, a fake retriever, a fake endpoint's env).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qrb.chat import generate_answers, token_nll_rows

from . import EvaluateParams
from .metrics import Scorer, aggregate
from .questions import freshness_subsets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalModel:
    """The adapter model as every local row runs it: the same system prompt, batching and generation params."""

    model: Any
    tokenizer: Any
    system: str
    p: EvaluateParams
    max_length: int  # base.max_length: the one limit every eval CE counts within

    def answer(self, prompts: list[str], refs: list[str], desc: str) -> tuple[list[str], list[dict[str, Any]]]:
        """The answers to `prompts`, and per prompt the summed NLL and token count of its reference (for CE)."""
        p = self.p
        answers = generate_answers(self.model, self.tokenizer, prompts, self.system, batch_size=p.batch_size,
                                   max_new_tokens=p.max_new_tokens, greedy=p.greedy, desc=desc)
        pairs = [{"question": q, "answer": a} for q, a in zip(prompts, refs)]
        nll = token_nll_rows(self.model, self.tokenizer, pairs, self.system, batch_size=p.batch_size,
                             max_length=self.max_length, desc=f"CE {desc}")
        return answers, [{"nll": a, "answer_tokens": b} for a, b in nll]


def local_answers(local: LocalModel, set_name: str, rows: Sequence[dict[str, Any]],
                  retriever=None) -> tuple[dict[str, list[str]], dict[str, list[dict[str, Any]]]]:
    """The local rows of one set: fine_tuned, base (adapter disabled) and rag (base + retrieved abstracts, when
    `rag_top_k` > 0). Returns (answers, per-question extras: NLL, answer tokens, retrieval hit) by model."""
    from qrb.retrieval import rag_prompt

    p = local.p
    questions = [r["question"] for r in rows]
    refs = [r["answer"] for r in rows]
    answers: dict[str, list[str]] = {}
    extras: dict[str, list[dict[str, Any]]] = {}
    answers["fine_tuned"], extras["fine_tuned"] = local.answer(questions, refs, f"{set_name}/fine_tuned")
    with local.model.disable_adapter():
        answers["base"], extras["base"] = local.answer(questions, refs, f"{set_name}/base")
        if p.rag_top_k > 0:
            if retriever is None:
                raise ValueError("evaluate: rag_top_k > 0 needs a retriever")
            hits = retriever.top_k(questions, p.rag_top_k)
            prompts = [rag_prompt(q, h, p.rag_max_chars) for q, h in zip(questions, hits)]
            answers["rag"], extras["rag"] = local.answer(prompts, refs, f"{set_name}/rag")
            for ex, r, h in zip(extras["rag"], rows, hits, strict=True):
                doi = r.get("doi")
                ex["retrieval_hit"] = (doi in {ps.doi for ps, _ in h}) if doi else None
                ex["retrieved"] = [ps.doi for ps, _ in h]
    return answers, extras


def score_set(scorer: Scorer, set_name: str, rows: Sequence[dict[str, Any]], answers: dict[str, list[str]],
              extras: dict[str, list[dict[str, Any]]], dates: Sequence[dt.date | None],
              cutoff: dt.date) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Per-question scores by model (extras merged in) and the prediction records of one set."""
    refs = [r["answer"] for r in rows]
    per_row: dict[str, list[dict[str, Any]]] = {}
    predictions: list[dict[str, Any]] = []
    for name, preds in answers.items():
        scored = scorer.rows(preds, refs)
        for s, ex in zip(scored, extras.get(name, [{}] * len(scored)), strict=True):
            s.update({k: v for k, v in ex.items() if k != "retrieved"})
        per_row[name] = scored
        for i, (r, pred, s) in enumerate(zip(rows, preds, scored, strict=True)):
            predictions.append({
                "set": set_name, "model": name, "id": r.get("id"), "doi": r.get("doi"),
                "paper_date": dates[i].isoformat() if dates[i] else None,
                "after_cutoff": None if dates[i] is None else dates[i] > cutoff,
                "question": r["question"], "reference": r["answer"], "prediction": pred,
                **({"retrieved": extras[name][i]["retrieved"]} if name == "rag" else {}),
                **{k: v for k, v in s.items() if k != "bleu_stats"}})
    return per_row, predictions


def set_metrics(set_name: str, per_row: dict[str, list[dict[str, Any]]], subsets: dict[str, list[int]], *,
                seed: int, samples: int) -> dict[str, dict[str, Any]]:
    """{set: {model: metrics}} for the whole set and each non-empty freshness split (`<set>_after_cutoff`...)."""
    out = {set_name: {name: aggregate(sr, seed=seed, samples=samples) for name, sr in per_row.items()}}
    for sub, idx in subsets.items():
        if idx:
            out[f"{set_name}_{sub}"] = {name: aggregate([sr[i] for i in idx], seed=seed, samples=samples)
                                        for name, sr in per_row.items()}
    return out


def evaluate(base: dict[str, Any], p: EvaluateParams, model, tokenizer, sets: dict[str, list[dict[str, Any]]], *,
             papers: Sequence[dict[str, Any]] = (), retriever=None, scorer: Scorer | None = None,
             env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """Answer every set with every model, score them. Returns (metrics, predictions, skipped rivals: reason).

    `retriever` (a `qrb.retrieval.Retriever`) is needed for the RAG row when `rag_top_k` > 0.
    """
    from qrb.rivals import ask_rival

    scorer = scorer or Scorer(p.bertscore_model, p.bertscore_num_layers)
    system = base["system_prompt"]
    local = LocalModel(model, tokenizer, system, p, base["max_length"])
    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for set_name, rows in sets.items():
        questions = [r["question"] for r in rows]
        answers, extras = local_answers(local, set_name, rows, retriever)
        for rival in p.rivals:
            if rival.key in skipped:
                continue
            res = ask_rival(rival, questions, system, max_tokens=p.max_new_tokens,
                            temperature=0.0 if p.greedy else 1.0, timeout_s=p.rival_timeout_s,
                            max_retries=p.rival_max_retries, concurrency=p.rival_concurrency, env=env)
            if res.skipped:
                skipped[rival.key] = res.skipped
                for done in [s for s in metrics if rival.key in metrics[s]]:  # answered an earlier set: drop it
                    metrics[done].pop(rival.key)
                predictions = [r for r in predictions if r["model"] != rival.key]
                continue
            answers[rival.key] = res.answers or []

        subsets, dates = freshness_subsets(rows, p.knowledge_cutoff, papers)
        per_row, set_predictions = score_set(scorer, set_name, rows, answers, extras, dates, p.knowledge_cutoff)
        predictions += set_predictions
        metrics.update(set_metrics(set_name, per_row, subsets, seed=base["seed"], samples=p.bootstrap_samples))
        for name, m in metrics[set_name].items():
            log.info("%s/%s: BERTScore F1 %.3f ROUGE-1 %.3f BLEU %.2f", set_name, name, m["bertscore_f1"],
                     m["rouge1"], m["bleu"])
    return metrics, predictions, skipped
