"""The card's evaluation section from reports/evaluate.json: one table per question set (the local models and the
rivals, the grades beside the style metrics), why the freshness subsets' n need not add up, and what the grades say
in words (see `stages.model_card`)."""

from __future__ import annotations

from typing import Any

SET_ORDER = ("golden", "seen", "eval", "invented")
SET_DESCRIPTIONS = {"golden": "the card's questions", "seen": "seen papers, new questions",
                    "eval": "held-out papers", "invented": "papers that do not exist"}
ABSTAIN_SETS = ("eval", "invented")  # closed-book, the right answer is not to attempt
SUBSETS = {"after_cutoff": "on papers first public after the knowledge cutoff",
           "before_cutoff": "on papers first public on or before the knowledge cutoff"}
LOCAL_ORDER = ("base", "fine_tuned", "rag", "fine_tuned_rag")
# (column title, metric key, decimals, signed): the grades and answer length first, so that a style gain (shorter
# answers in the abstracts' words: higher ROUGE) cannot pass for knowledge
COLUMNS = (("correct", "correct", 3, False), ("Δ correct vs base", "correct_gain", 3, True),
           ("not attempted", "not_attempted", 3, False), ("hallucination rate", "hallucination_rate", 3, False),
           ("recall@k", "recall_at_k", 3, False), ("citation accuracy", "citation_accuracy", 3, False),
           ("words", "answer_words", 1, False), ("eval CE", "cross_entropy", 4, False),
           ("BERTScore F1", "bertscore_f1", 4, False), ("ROUGE-1", "rouge1", 4, False), ("ROUGE-2", "rouge2", 4, False),
           ("ROUGE-L", "rougeL", 4, False), ("BLEU", "bleu", 2, False))
# compared in words, fine-tuned against base: (key, name, decimals)
COMPARED = (("cross_entropy", "eval CE (lower is better)", 4), ("bertscore_f1", "BERTScore F1", 4),
            ("rougeL", "ROUGE-L", 4))
INDEX_METRICS = {"correct": "correct", "not_attempted": "not attempted", "hallucination_rate": "hallucination rate",
                 "answer_words": "answer words", "bertscore_f1": "BERTScore F1", "rouge1": "ROUGE-1",
                 "rougeL": "ROUGE-L", "bleu": "BLEU", "cross_entropy": "eval cross-entropy"}


def model_label(name: str, base_name: str) -> str:
    return {"base": f"base ({base_name})", "fine_tuned": "fine-tuned (this adapter)",
            "rag": "RAG (base + the passages qrb ask --rag retrieves)",
            "fine_tuned_rag": "fine-tuned + RAG (this adapter + the same passages)"}.get(name,
                                                                                       name.removeprefix("rival_"))


def split_name(set_name: str) -> tuple[str, str | None]:
    for suffix in SUBSETS:
        if set_name.endswith("_" + suffix):
            return set_name.removesuffix("_" + suffix), suffix
    return set_name, None


def set_title(set_name: str) -> str:
    name, sub = split_name(set_name)
    if sub:
        return f"{name} questions {SUBSETS[sub]}"
    return f"{name} questions" + (f" ({SET_DESCRIPTIONS[name]})" if name in SET_DESCRIPTIONS else "")


def fmt(v: Any, decimals: int, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v:{'+' if signed else ''}.{decimals}f}" if isinstance(v, float) else str(v)


def with_interval(m: dict[str, Any], key: str, decimals: int, signed: bool = False) -> str:
    if m.get(key) is None:
        return "–"
    ci = m.get(f"{key}_ci95")
    cell = fmt(m[key], decimals, signed)
    if isinstance(ci, str):  # "n too small"
        return f"{cell} ({ci})"
    if isinstance(ci, list) and len(ci) == 2:
        return f"{cell} [{fmt(ci[0], decimals)}, {fmt(ci[1], decimals)}]"
    return cell


def metrics_table(by_model: dict[str, Any], base_name: str) -> list[str]:
    """The local models first, in LOCAL_ORDER, then the rivals; only the columns some model has."""
    models = {m: v for m, v in by_model.items() if isinstance(v, dict)}
    order = [m for m in LOCAL_ORDER if m in models] + [m for m in models if m not in LOCAL_ORDER]
    cols = [c for c in COLUMNS if any(c[1] in v for v in models.values())]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in order:
        cells = [with_interval(models[name], key, dec, signed) for _, key, dec, signed in cols]
        lines.append(f"| {model_label(name, base_name)} | " + " | ".join(cells) + " |")
    return lines


def zero_verdict(ci: Any) -> str:
    """What a paired difference's interval says."""
    if not (isinstance(ci, list) and len(ci) == 2):
        return "with no interval"
    if ci[0] > 0:
        return "which excludes zero (above base)"
    if ci[1] < 0:
        return "which excludes zero (below base)"
    return "not distinguishable from zero"


def gain_shown(m: dict[str, Any]) -> bool:
    """Whether a model is correct more often than base, with a paired interval above zero."""
    ci = m.get("correct_gain_ci95")
    return isinstance(ci, list) and len(ci) == 2 and ci[0] > 0


def _count(m: dict[str, Any], key: str) -> int:
    return round(m[key] * (m.get("graded_n", m["n"]) if key in ("correct", "incorrect") else m["n"]))


def grade_lines(name: str, m: dict[str, Any], base: dict[str, Any], declining: bool) -> list[str]:
    """The grades in words: correct against base with the paired gain, or (where the right answer is to decline) how
    often it does not attempt, and how often what it does answer is wrong."""
    if m.get("correct") is None or base.get("correct") is None:
        return []
    graded = m.get("graded_n", m["n"])
    right = (f"{name} is correct on {_count(m, 'correct')} of {graded} questions "
             f"({with_interval(m, 'correct', 3)}) vs {_count(base, 'correct')} for base")
    if m.get("correct_gain") is not None:
        ci = m.get("correct_gain_ci95")
        right += (f"; the paired gain is {with_interval(m, 'correct_gain', 3, signed=True)}"
                  + ("" if isinstance(ci, str) else f", {zero_verdict(ci)}"))
    declines = (f"{name} does not attempt {_count(m, 'not_attempted')} of {m['n']} "
                f"({with_interval(m, 'not_attempted', 3)}) vs {_count(base, 'not_attempted')} for base")
    if m.get("hallucination_rate") is not None:
        declines += (f"; of the answers it attempts, {_count(m, 'incorrect')} are wrong (hallucination rate "
                     f"{with_interval(m, 'hallucination_rate', 3)})")
    return [f"- **Not attempted:** {declines}.", f"- **Correct:** {right}."] if declining else \
        [f"- **Correct:** {right}.", f"- **Not attempted:** {declines}."]


def comparison(m: dict[str, Any], base: dict[str, Any], key: str, name: str, decimals: int) -> str | None:
    a, b = m.get(key), base.get(key)
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return None
    where = "above" if a > b else "below" if a < b else "equal to"
    ia, ib = m.get(f"{key}_ci95"), base.get(f"{key}_ci95")
    if isinstance(ia, list) and isinstance(ib, list):
        overlap = "the intervals overlap" if ia[0] <= ib[1] and ib[0] <= ia[1] else "the intervals do not overlap"
    elif isinstance(ia, str) or isinstance(ib, str):
        overlap = "n too small for intervals"
    else:
        overlap = "no intervals"
    return (f"{name}: fine-tuned is {where} base "
            f"({with_interval(m, key, decimals)} vs {with_interval(base, key, decimals)}; {overlap})")


def findings(by_model: dict[str, Any], set_name: str = "") -> list[str]:
    """What the set's numbers say about the adapter against its base, in words."""
    tuned, base = by_model.get("fine_tuned"), by_model.get("base")
    if not isinstance(tuned, dict) or not isinstance(base, dict) or not tuned.get("n"):
        return []
    declining = split_name(set_name)[0] in ABSTAIN_SETS
    lines = grade_lines("fine-tuned", tuned, base, declining) or [
        "- **Grades:** not in reports/evaluate.json (the evaluate run that wrote it graded no answer)."]
    for name in ("rag", "fine_tuned_rag"):
        m = by_model.get(name)
        if isinstance(m, dict) and (more := grade_lines(model_label(name, "").split(" (")[0], m, base, declining)):
            lines.append("- " + more[0].split(":** ", 1)[1])
        if isinstance(m, dict) and m.get("citation_accuracy") is not None:
            lines.append(f"- {model_label(name, '').split(' (')[0]}: citation accuracy "
                         f"{with_interval(m, 'citation_accuracy', 3)} (the share of its attempted answers whose first "
                         f"cited paper is the question's), recall@k {with_interval(m, 'recall_at_k', 3)} (the share of "
                         "questions whose paper was among those retrieved).")
    lines += [f"- {c}." for key, name, dec in COMPARED if (c := comparison(tuned, base, key, name, dec))]
    if isinstance(tuned.get("answer_words"), (int, float)) and isinstance(base.get("answer_words"), (int, float)):
        lines.append(f"- Answer length: fine-tuned {tuned['answer_words']:.1f} words vs {base['answer_words']:.1f} "
                     "for base.")
    style_up = any(isinstance(tuned.get(k), (int, float)) and isinstance(base.get(k), (int, float))
                   and tuned[k] > base[k] for k in ("rougeL", "bertscore_f1"))
    if style_up and not gain_shown(tuned):
        lines.append("- Higher ROUGE or BERTScore without a gain in correct answers distinguishable from zero is style "
                     "(the wording and length of the references), not evidence that the adapter knows the facts.")
    return lines


def subset_note(set_name: str, evaluate: dict[str, Any]) -> str | None:
    """Why the freshness subsets' n need not add up to the set's."""
    n = set_n(evaluate.get(set_name))
    if not n:
        return None
    a, b = (set_n(evaluate.get(f"{set_name}_{s}")) for s in SUBSETS)
    undated = n - a - b
    if not a + b:
        return (f"No question of the {n} has a publication date evaluate could find (no arXiv id and no journal "
                "date of their paper), so there are no freshness subsets.")
    if undated > 0:
        return (f"The freshness subsets below hold {a} + {b} of the {n} questions: the other {undated} have no "
                "publication date evaluate could find (no arXiv id and no journal date of their paper), and an "
                "undated question is in neither subset (`evaluate.knowledge_cutoff` splits the dated ones).")
    return (f"The freshness subsets below split the {n} questions {a} + {b} by when their paper first became public, "
            "against the base model's knowledge cutoff (`evaluate.knowledge_cutoff`).")


def set_n(by_model: Any) -> int:
    if not isinstance(by_model, dict) or not by_model:
        return 0
    first = next(iter(by_model.values()))
    return first.get("n") or 0 if isinstance(first, dict) else 0


def set_order(evaluate: dict[str, Any]) -> list[str]:
    mains = [s for s in evaluate if split_name(s)[1] is None]
    mains = [s for s in SET_ORDER if s in mains] + [s for s in mains if s not in SET_ORDER]
    out = []
    for s in mains:
        out += [s] + [f"{s}_{sub}" for sub in SUBSETS if f"{s}_{sub}" in evaluate]
    return out


def evaluation_section(evaluate: dict[str, Any], base_name: str) -> list[str]:
    lines: list[str] = []
    for set_name in set_order(evaluate):
        by_model = evaluate[set_name]
        n = set_n(by_model)
        lines += [f"### {set_title(set_name)} (n={n})", ""]
        if not n:
            lines += ["No questions in this set in this run.", ""]
            continue
        first = next(iter(by_model.values()))
        if split_name(set_name)[1] is None and first.get("graded_n") is not None and first["graded_n"] < n:
            lines += [f"Correct and hallucination rate over the {first['graded_n']} of {n} questions that have a "
                      "short gold answer (the others count only towards not attempted).", ""]
        lines += metrics_table(by_model, base_name) + [""]
        if split_name(set_name)[1] is None:
            lines += findings(by_model, set_name)
            note = subset_note(set_name, evaluate)
            lines += ["", *([note, ""] if note else [])]
    return lines


def adapter_shows_gain(evaluate: dict[str, Any]) -> list[str]:
    """The main sets on which fine-tuned is correct more often than base (paired interval above zero)."""
    return [s for s in set_order(evaluate) if split_name(s)[1] is None
            and isinstance(m := evaluate[s].get("fine_tuned"), dict) and m.get("n") and gain_shown(m)]


def in_short(evaluate: dict[str, Any]) -> str:
    """The evaluation in one paragraph: correct where the papers were trained on, declining where it cannot know."""
    parts = []
    for s in ("seen", "golden"):
        t, b = (evaluate.get(s) or {}).get("fine_tuned"), (evaluate.get(s) or {}).get("base")
        if isinstance(t, dict) and isinstance(b, dict) and t.get("correct") is not None:
            gain = (f", a paired gain of {with_interval(t, 'correct_gain', 3, signed=True)}"
                    if t.get("correct_gain") is not None else "")
            parts.append(f"on {s} questions fine-tuned is correct on {t['correct']:.0%} vs {b.get('correct', 0):.0%} "
                         f"for base{gain}")
    for s in ABSTAIN_SETS:
        t = (evaluate.get(s) or {}).get("fine_tuned")
        if isinstance(t, dict) and t.get("not_attempted") is not None:
            what = "held-out" if s == "eval" else "invented"
            ci = t.get("not_attempted_ci95")
            parts.append(f"on {what} papers it does not attempt {t['not_attempted']:.0%} of the questions"
                         + (f" (95% interval {ci[0]:.0%} to {ci[1]:.0%})" if isinstance(ci, list) else ""))
    return ("; ".join(parts) + ".") if parts else "no answer was graded (reports/evaluate.json has no grades)."


def eval_results(evaluate: dict[str, Any]):
    """model-index entries for the fine-tuned model (the Hub shows them): the exact values of the metrics file."""
    from huggingface_hub import EvalResult

    out = []
    for set_name in set_order(evaluate):
        m = evaluate[set_name].get("fine_tuned") if isinstance(evaluate[set_name], dict) else None
        if not isinstance(m, dict) or not m.get("n"):
            continue
        for key, title in INDEX_METRICS.items():
            if isinstance(m.get(key), (int, float)):
                out.append(EvalResult(task_type="question-answering", task_name="Question answering",
                                      dataset_type=f"qrb-{set_name}", dataset_name=set_title(set_name),
                                      metric_type=key, metric_name=title, metric_value=m[key]))
    return out
