"""The card's evaluation section from reports/evaluate.json: one table per question set (the four local models and
the rivals, fact recall and answer length beside the style metrics), why the freshness subsets' n do not add up,
and in words what the numbers say: where fine-tuned is above or below its base, whether the intervals overlap,
and whether its fact-recall gain is distinguishable from zero."""

from __future__ import annotations

from typing import Any

SET_ORDER = ("golden", "seen", "eval")
SET_DESCRIPTIONS = {"golden": "the card's questions", "seen": "seen papers, new questions",
                    "eval": "held-out papers"}
SUBSETS = {"after_cutoff": "on papers first public after the knowledge cutoff",
           "before_cutoff": "on papers first public on or before the knowledge cutoff"}
LOCAL_ORDER = ("base", "fine_tuned", "rag", "fine_tuned_rag")
# (column title, metric key, decimals, signed): fact recall and answer length first, so that a style gain (shorter
# answers in the abstracts' words: higher ROUGE) cannot pass for knowledge
COLUMNS = (("fact recall", "fact_recall", 3, False), ("Δ fact recall vs base", "fact_recall_gain", 3, True),
           ("facts stated", "facts_stated", 3, False), ("words", "answer_words", 1, False),
           ("eval CE", "cross_entropy", 4, False), ("BERTScore F1", "bertscore_f1", 4, False),
           ("ROUGE-1", "rouge1", 4, False), ("ROUGE-2", "rouge2", 4, False), ("ROUGE-L", "rougeL", 4, False),
           ("BLEU", "bleu", 2, False))
# compared in words, fine-tuned against base: (key, name, decimals)
COMPARED = (("cross_entropy", "eval CE (lower is better)", 4), ("bertscore_f1", "BERTScore F1", 4),
            ("rougeL", "ROUGE-L", 4))
INDEX_METRICS = {"fact_recall": "fact recall", "facts_stated": "facts stated", "answer_words": "answer words",
                 "bertscore_f1": "BERTScore F1", "rouge1": "ROUGE-1", "rougeL": "ROUGE-L", "bleu": "BLEU",
                 "cross_entropy": "eval cross-entropy"}


def model_label(name: str, base_name: str) -> str:
    return {"base": f"base ({base_name})", "fine_tuned": "fine-tuned (this adapter)",
            "rag": "RAG (base + retrieved abstracts)",
            "fine_tuned_rag": "fine-tuned + RAG (this adapter + the same abstracts)"}.get(name,
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


def _num(v: Any, decimals: int, signed: bool = False) -> str:
    return f"{v:{'+' if signed else ''}.{decimals}f}" if isinstance(v, float) else str(v)


def with_interval(m: dict[str, Any], key: str, decimals: int, signed: bool = False) -> str:
    if m.get(key) is None:
        return "–"
    ci = m.get(f"{key}_ci95")
    cell = _num(m[key], decimals, signed)
    if isinstance(ci, str):  # "n too small"
        return f"{cell} ({ci})"
    if isinstance(ci, list) and len(ci) == 2:
        return f"{cell} [{_num(ci[0], decimals)}, {_num(ci[1], decimals)}]"
    return cell


def ordered_models(by_model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    models = {m: v for m, v in by_model.items() if isinstance(v, dict)}
    first = [m for m in LOCAL_ORDER if m in models]
    return {m: models[m] for m in first + [m for m in models if m not in first]}


def metrics_table(by_model: dict[str, Any], base_name: str) -> list[str]:
    models = ordered_models(by_model)
    cols = [c for c in COLUMNS if any(c[1] in v for v in models.values())]
    lines = ["| model | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in models.items():
        cells = [with_interval(m, key, dec, signed) for _, key, dec, signed in cols]
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
    """Whether a model states the facts more often than base, with a paired interval above zero."""
    return any(isinstance(ci := m.get(f"{k}_gain_ci95"), list) and len(ci) == 2 and ci[0] > 0
               for k in ("fact_recall", "facts_stated"))


def fact_line(name: str, m: dict[str, Any], base: dict[str, Any]) -> str | None:
    fact_n = m.get("fact_n")
    if not fact_n or m.get("fact_recall") is None or base.get("fact_recall") is None:
        return None
    if m.get("facts_stated") is not None and base.get("facts_stated") is not None:
        said, base_said = round(m["facts_stated"] * fact_n), round(base["facts_stated"] * fact_n)
        parts = [f"{name} states the reference's key facts in {said} of {fact_n} answers vs {base_said} for base"]
    else:
        parts = [f"{name}'s fact recall is {with_interval(m, 'fact_recall', 3)} vs "
                 f"{with_interval(base, 'fact_recall', 3)} for base ({fact_n} questions)"]
    for key, what in (("facts_stated_gain", "facts stated"), ("fact_recall_gain", "fact recall")):
        if m.get(key) is not None:
            ci = m.get(key + "_ci95")  # "n too small" is in the cell already
            verdict = "" if isinstance(ci, str) else f", {zero_verdict(ci)}"
            parts.append(f"the paired difference in {what} is {with_interval(m, key, 3, signed=True)}{verdict}")
    return "; ".join(parts)


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


def findings(by_model: dict[str, Any]) -> list[str]:
    """What the set's numbers say about the adapter against its base, in words."""
    tuned, base = by_model.get("fine_tuned"), by_model.get("base")
    if not isinstance(tuned, dict) or not isinstance(base, dict) or not tuned.get("n"):
        return []
    lines = []
    facts = fact_line("fine-tuned", tuned, base)
    if facts:
        lines.append(f"- **Fact recall:** {facts}.")
    elif tuned.get("fact_n") == 0:
        lines.append("- **Fact recall:** not measured on this set (no reference has a key fact beyond its question).")
    else:
        lines.append("- **Fact recall:** not in reports/evaluate.json (the evaluate run that wrote it measured none).")
    for name in ("rag", "fine_tuned_rag"):
        m = by_model.get(name)
        if isinstance(m, dict) and (line := fact_line(model_label(name, "").split(" (")[0], m, base)):
            lines.append(f"- {line}.")
    lines += [f"- {c}." for key, name, dec in COMPARED if (c := comparison(tuned, base, key, name, dec))]
    if isinstance(tuned.get("answer_words"), (int, float)) and isinstance(base.get("answer_words"), (int, float)):
        lines.append(f"- Answer length: fine-tuned {tuned['answer_words']:.1f} words vs {base['answer_words']:.1f} "
                     "for base.")
    style_up = any(isinstance(tuned.get(k), (int, float)) and isinstance(base.get(k), (int, float))
                   and tuned[k] > base[k] for k in ("rougeL", "bertscore_f1"))
    if style_up and not gain_shown(tuned):
        lines.append("- Higher ROUGE or BERTScore without a fact-recall gain distinguishable from zero is style "
                     "(the wording and length of the references), not evidence that the adapter knows the facts.")
    return lines


def subset_note(set_name: str, evaluate: dict[str, Any]) -> str | None:
    """Why the freshness subsets' n need not add up to the set's."""
    n = _n(evaluate.get(set_name))
    if not n:
        return None
    a, b = (_n(evaluate.get(f"{set_name}_{s}")) for s in SUBSETS)
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


def _n(by_model: Any) -> int:
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
        n = _n(by_model)
        lines += [f"### {set_title(set_name)} (n={n})", ""]
        if not n:
            lines += ["No questions in this set in this run.", ""]
            continue
        first = next(iter(by_model.values()))
        if split_name(set_name)[1] is None and first.get("fact_n") is not None and first["fact_n"] < n:
            lines += [f"Fact recall over the {first['fact_n']} of {n} questions whose reference has a key fact "
                      "beyond the question.", ""]
        lines += metrics_table(by_model, base_name) + [""]
        if split_name(set_name)[1] is None:
            lines += findings(by_model)
            note = subset_note(set_name, evaluate)
            lines += ["", *([note, ""] if note else [])]
    return lines


def adapter_shows_gain(evaluate: dict[str, Any]) -> list[str]:
    """The main sets on which fine-tuned states the facts more often than base (paired interval above zero)."""
    return [s for s in set_order(evaluate) if split_name(s)[1] is None
            and isinstance(m := evaluate[s].get("fine_tuned"), dict) and m.get("n") and gain_shown(m)]


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
