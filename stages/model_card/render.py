"""The card's text: YAML metadata + the Markdown sections, from the inputs only (pure: no file is read here)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from . import ModelCardParams
from .evaluation import adapter_shows_gain, eval_results, evaluation_section, in_short, set_n
from .inputs import DATASET, BaseInfo, CardInputs, GeneratorInfo
from .sections import (
    METHOD_NAMES,
    attribution,
    built_from,
    compute_and_lineage,
    fmt,
    licence_name,
    loss_section,
    training_procedure,
)

SMOKE_WHAT = ("the extractive smoke-test endpoint, not a language model: it copies sentences of the abstracts into "
              "answers under templated questions")


def base_line(b: BaseInfo) -> str:
    lic = f"licence `{b.license}`" if b.license else "licence not recorded (set `model_card.base_license`)"
    prov = b.provenance
    if prov.get("source_package"):
        return (f"{b.name} by {prov.get('author', 'its authors')} (`{b.hub_id or b.ref}`), {lic}; the local copy "
                f"`{b.ref}` was converted from `{prov.get('source_file')}` of the PyPI package "
                f"`{prov['source_package']}` {prov.get('source_package_version', '')}: {prov.get('conversion', '')}")
    if b.stand_in:
        return f"`{b.ref}`: an offline stand-in, not a pretrained language model (see the note above); {lic}"
    return f"`{b.ref}`" + (" (a local folder)" if b.local else "") + f", {lic}"


def what_it_is(b: BaseInfo, g: GeneratorInfo) -> list[str]:
    """The warning at the top when the run is a test of the pipeline rather than a model to use."""
    if not b.stand_in and not g.smoke:
        return []
    parts = []
    if b.stand_in:
        parts.append(f"The base `{b.ref}` is an offline stand-in, not a pretrained language model; its README says: "
                     f"\"{b.readme}\"")
    if g.smoke:
        parts.append(f"The training pairs were written by {g.label}, {SMOKE_WHAT}.")
    head = ("A pipeline test, not a model to use." if b.stand_in else
            f"Synthetic test data on a real base ({b.name}).")
    tail = ("The numbers below check the pipeline's plumbing; they say nothing about what a model can learn "
            "from the papers." if b.stand_in else
            "The numbers below measure what fine-tuning on such pairs teaches this base; the adapter is no "
            "question-answering aid.")
    return [f"> **{head}** " + " ".join(parts) + " " + tail, ""]


def data_licence(papers: list[dict[str, Any]]) -> str:
    recorded = Counter(licence_name(x["license"]) for x in papers if x.get("license"))
    missing = sum(1 for x in papers if not x.get("license"))
    text = " / ".join(f"{lic}" + (f" ({n} papers)" if len(recorded) > 1 else "") for lic, n in recorded.items())
    text = text or "not recorded"
    if missing and recorded:
        text += f"; not recorded for {missing} papers"
    return (f"the papers' {text} (each paper is listed under License and attribution); the question-answer pairs "
            "were generated from them")


def intended_use(b: BaseInfo, g: GeneratorInfo, shown: list[str]) -> str:
    if b.stand_in:
        return ("**Intended use:** none beyond testing the pipeline: the base is a stand-in, not a language model, "
                "so its answers are not meant to be read.")
    if g.smoke:
        return ("**Intended use:** measuring the training recipe on a real small base with templated, extractive "
                "pairs; not a question-answering aid.")
    if not shown:
        return ("**Intended use:** an experiment. The evaluation below does not show that fine-tuning taught the "
                "papers' facts (no question set where fine-tuned is correct more often than its base with a "
                "paired interval above zero); to ask about the papers, use retrieval (the RAG rows) or the papers.")
    return ("**Intended use:** asking about the content of recent *Quantum* papers (results, methods, definitions, "
            "what is new) as a research aid, with the papers at hand to check the answers; fine-tuned states the "
            f"correct answers more often than its base on the {', '.join(shown)} questions.")


def training_data_rows(inp: CardInputs) -> list[str]:
    sc, gen, val = (inp.metrics[k] for k in ("scrape", "generate", "validate"))
    kept = val.get("rows_out", {})
    every = inp.pairs["train"] + inp.pairs["eval"]
    facts = Counter(str(r["prompt_id"]) for r in every if r.get("prompt_id") and not r.get("variant"))
    rows = [f"| source | quantum-journal.org papers (title, abstract, metadata"
            f"{', arXiv full text' if sc.get('full_text_fetched') else ''}) |",
            f"| publication window | {sc.get('date_from')} to {sc.get('date_to')} |",
            f"| papers scraped | {sc.get('papers_kept')} ({sc.get('requests')} requests, {sc.get('errors')} errors) |",
            f"| generator model | {inp.generator.label}{f' ({SMOKE_WHAT})' if inp.generator.smoke else ''} |",
            f"| prompts (kept facts per prompt) | {', '.join(f'`{k}` {v}' for k, v in sorted(facts.items()))} |",
            f"| pairs generated | {gen.get('pairs_raw')} ({gen.get('duplicates_exact', 0) + gen.get('duplicates_near', 0)}"
            f" duplicates removed, {gen.get('pairs')} kept) |",
            f"| generation tokens / cost | {gen.get('total_tokens'):,} tokens, USD {gen.get('cost_usd', 0):.2f} |"
            if isinstance(gen.get("total_tokens"), int) else "| generation tokens / cost | n/a |",
            f"| validation | {val.get('rows_quarantined')} rows quarantined (fail rate {fmt(val.get('fail_rate'), 4)});"
            f" gate {'passed' if val.get('gate_passed') else 'FAILED'} |",
            f"| train / eval pairs | {kept.get('train')} / {kept.get('eval')} (split by paper: "
            f"{gen.get('train_papers')} / {gen.get('eval_papers')} papers) |"]
    train = inp.pairs["train"]
    if any("fact_id" in r for r in train):
        n_facts = len({r.get("fact_id") for r in train})
        reworded = sum(1 for r in train if r.get("variant"))
        rows.append(f"| knowledge augmentation | {len(train)} training pairs for {n_facts} facts ({reworded} "
                    f"reworded variant{'s' * (reworded != 1)}: the same fact in other words) |")
    seen = val.get("seen")
    if isinstance(seen, dict):
        rows.append(f"| seen questions (scored, never trained on) | {seen.get('rows_out')} kept of "
                    f"{seen.get('rows_in')} ({seen.get('rows_quarantined')} quarantined) |")
    elif inp.seen:
        rows.append(f"| seen questions (scored, never trained on) | {len(inp.seen)} |")
    return ["| | |", "|---|---|", *rows, ""]


def metadata(inp: CardInputs, p: ModelCardParams, peft_lib: bool) -> str:
    from huggingface_hub import ModelCardData

    b, g = inp.base, inp.generator
    tags = ["quantum-physics", "question-answering", "lora" if peft_lib else "reft", "qrb"]
    tags += ["offline-stand-in"] * b.stand_in + ["smoke-test-data"] * g.smoke
    extra = {"base_model_relation": "adapter"} if b.hub_id and peft_lib else {}
    data = ModelCardData(language=list(p.language), license=p.license, base_model=b.hub_id or b.ref,
                         datasets=list(p.datasets) or [DATASET], library_name="peft" if peft_lib else None,
                         pipeline_tag="text-generation", tags=tags, model_name=p.title,
                         metrics=["rouge", "bleu", "bertscore"], eval_results=eval_results(inp.metrics["evaluate"])
                         or None, **extra)
    return data.to_yaml()


def render(inp: CardInputs, p: ModelCardParams, base: dict[str, Any], has_png: bool) -> str:
    """Core: the card's full text (YAML metadata + Markdown), from the inputs only."""
    from huggingface_hub import ModelCard

    sc, gen, val, tr, ev = (inp.metrics[k] for k in ("scrape", "generate", "validate", "train", "evaluate"))
    b, g = inp.base, inp.generator
    train_p = (inp.lineage.get("params") or {}).get("train") or {}
    method = METHOD_NAMES.get(train_p.get("method"), train_p.get("method"))
    peft_lib = train_p.get("method") != "loreft"
    date_from, date_to = sc.get("date_from"), sc.get("date_to")
    kept = val.get("rows_out", {})
    seen_n = (val.get("seen") or {}).get("rows_out", len(inp.seen))
    shown = adapter_shows_gain(ev)

    L: list[str] = [f"# {p.title}", ""]
    L += [f"A {method} adapter of {b.name if b.provenance else f'`{b.ref}`'} that answers questions about research "
          f"published in the journal *Quantum* between {date_from} and {date_to}. It was fine-tuned on "
          f"{kept.get('train')} question-answer pairs that {g.label} wrote from "
          f"{gen.get('papers_with_pairs', gen.get('papers'))} papers, and evaluated on a fixed set of golden "
          f"questions, on {seen_n} new questions about facts it was trained on (seen papers, new questions) and on "
          f"{kept.get('eval')} pairs from held-out papers"
          + (f" and {invented} questions about papers that do not exist" if (invented := set_n(ev.get("invented"))) else "")
          + ". This card was written by the pipeline's `model_card` stage from its own outputs.", ""]
    L += what_it_is(b, g)

    trainable, total = tr.get("trainable_params"), tr.get("total_params")
    L += ["## Model details", "",
          f"- **Base model:** {base_line(b)}",
          f"- **Adapter:** {method}; {trainable:,} trainable of {total:,} parameters"
          if isinstance(trainable, int) and isinstance(total, int) else f"- **Adapter:** {method}",
          f"- **Adapter licence:** `{p.license}`",
          f"- **Training data licence:** {data_licence(inp.papers)}",
          f"- **Language:** {', '.join(p.language)}",
          f"- **System prompt** (used in training, evaluation and serving): \"{base['system_prompt']}\"",
          f"- **Built by:** the quantum-research-bot pipeline at commit {built_from(inp.lineage)}", ""]

    L += ["## Intended use and limits", "", f"- {intended_use(b, g, shown)}",
          f"- **Knowledge window:** the adapter was trained on papers published {date_from} to {date_to}; beyond "
          "what its base learnt in pre-training, it knows only what these abstracts and their generated pairs say.",
          f"- **Synthetic training data:** the question-answer pairs were written by {g.label}"
          f"{f' ({SMOKE_WHAT})' if g.smoke else ''}, not by the papers' authors, and can carry its errors; "
          "validation checked grounding in the paper text, not truth.",
          "- **Not for:** citations, authoritative claims, or safety-relevant decisions. It can state plausible but "
          "wrong facts (hallucinate), mix up papers, and inherits the base model's biases and limits.",
          "- **Evaluation:** each answer is graded correct, incorrect or not attempted against a short gold answer "
          "(the key number, name or term); ROUGE, BLEU and BERTScore measure overlap and similarity of wording, not "
          "factual correctness.", ""]

    L += ["## How to use", "",
          "From a pipeline workspace: `qrb ask \"…\"`, `qrb chat`, or `qrb serve` (an OpenAI-compatible API on "
          "127.0.0.1 with a web chat page); `--base` answers with the base model alone, for comparison.", ""]
    if peft_lib:
        L += ["```python", "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "tokenizer = AutoTokenizer.from_pretrained(\"<this folder>\")  # carries the added pad token",
              f"model = AutoModelForCausalLM.from_pretrained(\"{b.ref}\")",
              "model.resize_token_embeddings(len(tokenizer))  # qrb.chat.resize_for_tokenizer does it the same way",
              "model = PeftModel.from_pretrained(model, \"<this folder>\")", "```", ""]

    L += ["## Training data", "", *training_data_rows(inp)]
    L += training_procedure(inp, peft_lib)
    L += loss_section(inp.loss, has_png)

    L += ["## Evaluation", "",
          "Each model answers the same questions greedily, on four sets: golden (the card's questions), seen (facts "
          "the adapter was trained on, asked in words training never used: what fine-tuning can have taught), eval "
          "(papers training never saw: a closed-book model cannot know them and should not attempt them; only "
          "retrieval can) and invented (papers that do not exist: the right answer is to decline). Each answer is "
          "graded against the question's short gold answer (the key number, name or term), as SimpleQA grades: "
          "correct (the gold stated, no rival candidate beside it), incorrect (anything else it commits to) or not "
          "attempted (it declines); the hallucination rate is incorrect / (correct + incorrect); Δ correct vs base "
          "is the paired difference against the base on the same questions. Each metric carries its 95% bootstrap "
          "interval [lo, hi], or \"n too small\" below `evaluate.min_n_for_interval` questions. Words is the mean "
          "answer length; eval CE the token-weighted cross-entropy of the reference answers (lower is better; local "
          "models without retrieval); ROUGE is the F measure; BLEU sacrebleu's corpus score (0-100). The RAG rows "
          "answer as `qrb ask --rag` does and cite the papers of the passages shown: recall@k is the share of "
          "questions whose paper is among them, citation accuracy the share of attempted answers whose first cited "
          "paper is the question's (citing nothing counts as wrong).", "",
          "**In short:** " + in_short(ev), ""]
    L += evaluation_section(ev, b.name)
    L += compute_and_lineage(inp)
    L += attribution(inp.papers, p.license)
    return str(ModelCard(f"---\n{metadata(inp, p, peft_lib)}\n---\n\n" + "\n".join(L)))
