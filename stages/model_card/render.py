"""The card's text: YAML metadata + the Markdown sections (model details, use, training data and procedure, loss
curve, compute, lineage, licence and attribution of every paper used), from the inputs only (pure: no file is read
here; the evaluation section is `evaluation`'s)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from . import ModelCardParams
from .evaluation import adapter_shows_gain, eval_results, evaluation_section, fmt, in_short, set_n
from .inputs import DATASET, NOT_DATA, BaseInfo, CardInputs, GeneratorInfo

LOSS_PNG_NAME = "loss.png"
METHOD_NAMES = {"lora": "LoRA", "lora_plus": "LoRA+", "dora": "DoRA", "qlora": "QLoRA", "loreft": "LoReFT"}
NAME_SUFFIXES = {"jr", "sr", "ii", "iii", "iv"}  # "Smith, Jr." is no "Last, First"
SMOKE_WHAT = ("the extractive smoke-test endpoint, not a language model: it copies sentences of the abstracts into "
              "answers under templated questions")


def licence_name(lic: str) -> str:
    """`CC-BY-4.0` as people write it (CC BY 4.0); other ids as recorded."""
    return lic.replace("-", " ") if lic.upper().startswith("CC-") else lic


def base_revision(lin: dict[str, Any]) -> str | None:
    """The exact base weights the adapter was trained on, as lineage.json records them."""
    rev = lin.get("base_model_revision")
    if not isinstance(rev, dict):
        return None
    if rev.get("source") == "local":
        return (f"`{rev['dvc_md5']}` (md5 of the folder in `{rev.get('dvc_file')}`)" if rev.get("dvc_md5")
                else rev.get("note") or "a local folder not tracked by DVC")
    return f"`{rev['revision']}` (Hub commit, from {rev.get('from')})" if rev.get("revision") else "not known"


def built_from(lin: dict[str, Any]) -> str:
    """The project commit the adapter's code came from and, for a run in a scratch workspace, the workspace's own."""
    def at(commit: str | None, dirty: bool | None) -> str:
        return f"`{commit or 'not a git checkout'}`" + (" (with uncommitted changes)" if dirty else "")

    project = lin.get("project_commit", lin.get("git_commit"))
    text = at(project, lin.get("project_dirty", lin.get("git_dirty")))
    if lin.get("git_commit") and lin["git_commit"] != project:
        text += f", run in a scratch workspace at its commit {at(lin['git_commit'], lin.get('git_dirty'))}"
    return text


def cell(v: Any) -> str:
    """A table cell: lists joined, null as "off", and `|` escaped (it would end the cell)."""
    if isinstance(v, (list, tuple)):
        text = ", ".join(map(str, v)) if v else "(none)"
    elif v is None:
        text = "off"
    else:
        text = str(v)
    return f"`{text}`".replace("|", "\\|") if "|" in text or "<" in text else text


def hyperparameter_rows(train: dict[str, Any], base: dict[str, Any] | None = None) -> list[tuple[str, Any]]:
    """The recipe's `train:` section as the run recorded it, key by key (a sub-section as `section.key`), leaving out
    what the method does not use: the other adapter's sub-section, LoRA+'s ratio on another method."""
    method = train.get("method")
    unused = {"lora" if method == "loreft" else "loreft", *(["loraplus_lr_ratio"] * (method != "lora_plus"))}
    rows: list[tuple[str, Any]] = [("method", METHOD_NAMES.get(method, method))]
    for key, value in train.items():
        if key in unused or key == "method":
            continue
        rows += [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
    if "max_length" in (base or {}):  # one conversation-length limit for training and every eval CE
        rows.append(("max_length", base["max_length"]))
    return rows


def embeddings_note(inp: CardInputs, train: dict[str, Any]) -> list[str]:
    """How the embedding matrix trains: the recipe trains the input embedding, never lm_head; on a base that ties
    the two (SmolLM2 does), peft's modules_to_save trains a copy and so unties them."""
    if "embed_tokens" not in ((train.get("lora") or {}).get("modules_to_save") or []):
        return []
    b = inp.base
    if b.tied:
        return [f"**Embeddings on a tied base.** {b.name} ties its input embeddings and lm_head (one matrix, "
                "`tie_word_embeddings: true`). The recipe trains the input embedding in full (peft "
                "`modules_to_save: [embed_tokens]`) and not lm_head: peft trains a copy of the embedding while "
                "lm_head stays the frozen original, so the adapter unties the two. The merged and GGUF exports "
                "carry both matrices, the trained embedding and the base's lm_head, with "
                "`tie_word_embeddings: false`.", ""]
    if b.tied is False:
        return ["**Embeddings.** The base keeps separate input embeddings and lm_head: the recipe trains the input "
                "embedding in full (peft `modules_to_save: [embed_tokens]`) and lm_head stays frozen.", ""]
    return ["**Embeddings.** The input embedding trains as a full copy (peft `modules_to_save: [embed_tokens]`) and "
            "lm_head stays frozen: on a tied base this unties the model, and the merged and GGUF exports carry both "
            "matrices (`tie_word_embeddings: false`).", ""]


def training_procedure(inp: CardInputs, peft_lib: bool) -> list[str]:
    lin, tr = inp.lineage, inp.metrics["train"]
    params = lin.get("params") or {}
    train = params.get("train") or {}
    lines = ["## Training procedure", "", "| hyper-parameter | value |", "|---|---|"]
    lines += [f"| {k} | {cell(v)} |" for k, v in hyperparameter_rows(train, params.get("base") or {})]
    lines += [f"| seed | {lin.get('seed')} |", ""]
    if peft_lib:
        lines += embeddings_note(inp, train)
    lines += [f"Result: {tr.get('steps')} optimizer steps, final train loss {fmt(tr.get('train_loss'), 4)}, "
              f"token-weighted eval cross-entropy {fmt(tr.get('eval_ce'), 4)}.", ""]
    return lines


def loss_section(loss: dict[str, list[tuple[float, float]]], has_png: bool) -> list[str]:
    lines = ["### Loss curve", ""]
    train_loss, eval_loss = dict(loss.get("train", [])), dict(loss.get("eval", []))
    if has_png:  # the picture, and the (few) eval points as numbers
        lines += [f"![Train and eval loss]({LOSS_PNG_NAME})", "", "| step | eval loss |", "|---|---|"]
        lines += [f"| {step:g} | {fmt(v, 4)} |" for step, v in sorted(eval_loss.items())]
    else:  # no matplotlib: the whole curve as a table
        lines += ["| step | train loss | eval loss |", "|---|---|---|"]
        for step in sorted(set(train_loss) | set(eval_loss)):
            lines.append(f"| {step:g} | {fmt(train_loss.get(step), 4)} | {fmt(eval_loss.get(step), 4)} |")
    return lines + [""]


def compute_and_lineage(inp: CardInputs) -> list[str]:
    lin, tr = inp.lineage, inp.metrics["train"]
    hours = lin.get("wall_s") / 3600 if isinstance(lin.get("wall_s"), (int, float)) else None
    hw = lin.get("hardware") or {}
    cpu = ", ".join(str(x) for x in (hw.get("processor"), f"{hw['cpus']} cores" if hw.get("cpus") else None,
                                     hw.get("platform")) if x)
    device = f"{hw.get('gpu_count') or 1} x {hw['gpu']}" if hw.get("gpu") else f"CPU ({cpu or 'no details recorded'})"
    tokens = lin.get("tokens_seen") or tr.get("tokens_seen")
    emissions = lin.get("emissions") or tr.get("emissions")
    if isinstance(emissions, dict) and emissions.get("energy_kwh") is not None:
        energy = (f"{emissions['energy_kwh']:.4f} kWh, {emissions.get('co2_kg', float('nan')):.4f} kg CO2-eq "
                  f"(measured by codecarbon{', ' + emissions['country'] if emissions.get('country') else ''})")
    else:
        energy = ("not measured: the train stage ran without an energy meter (codecarbon), and this card does "
                  "not estimate it")
    lines = ["## Compute", "",
             f"- **Hardware:** {device}",
             f"- **Training time:** {fmt(hours, 3)} hours ({fmt(lin.get('wall_s'), 1)} s wall)",
             f"- **Tokens seen:** {f'{tokens:,}' if isinstance(tokens, int) else fmt(tokens, 1)}",
             f"- **Energy and emissions:** {energy}", ""]
    lines += ["## Lineage", "", f"- **Commit:** {built_from(lin)}",
              *([f"- **Adapter created:** {lin['created_utc']}"] if lin.get("created_utc") else []),
              *([f"- **Base model fingerprint:** `{lin['base_model_fingerprint']}`"]
                if lin.get("base_model_fingerprint") else []),
              *([f"- **Base model revision:** {revision}"] if (revision := base_revision(lin)) else []),
              "- **Libraries:** " + ", ".join(f"{k} {v}" for k, v in (lin.get("versions") or {}).items() if v), "",
              "| data | md5 (dvc.lock) |", "|---|---|"]
    hashes = {k: v for k, v in {**inp.data_hashes, **(lin.get("inputs") or {})}.items()
              if v and not k.startswith(NOT_DATA)}
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(hashes.items())]
    if lin.get("data_sha256"):
        lines.append(f"| training data (sha256 of the rows) | `{lin['data_sha256']}` |")
    return lines + [""]


def person(name: str) -> str:
    """One author as a reader writes the name: a recorded "Last, First" (one comma) becomes "First Last"."""
    name = " ".join(name.split())
    last, sep, first = name.partition(",")
    if sep and "," not in first and first.strip() and last.strip() \
            and first.strip().rstrip(".").lower() not in NAME_SUFFIXES:
        return f"{first.strip()} {last.strip()}"
    return name


def authors(paper: dict[str, Any]) -> list[str]:
    """Each recorded author once, in the recorded order (scrape records one list entry per author)."""
    out: dict[str, str] = {}
    for a in paper.get("authors") or []:
        if isinstance(a, str) and a.strip():
            name = person(a)
            out.setdefault(name.casefold(), name)
    return list(out.values())


def attribution(papers: list[dict[str, Any]], adapter_license: str) -> list[str]:
    lines = ["## License and attribution", "",
             f"The adapter is released under `{adapter_license}`. The training data was derived from the following "
             f"{len(papers)} papers published in *Quantum* (quantum-journal.org), each under the licence recorded "
             "with it (the journal publishes under the Creative Commons Attribution 4.0 International license, "
             "CC BY 4.0, https://creativecommons.org/licenses/by/4.0/); question-answer pairs were generated from "
             "their titles and abstracts (changes were made).", ""]
    for paper in sorted(papers, key=lambda x: (x.get("published") or "", x.get("doi") or "")):
        names = authors(paper)
        who = ", ".join(names) if names else "(no authors recorded by the scrape; see the DOI)"
        doi = paper.get("doi")
        ref = f"https://doi.org/{doi}" if doi else paper.get("url", "")
        lic = licence_name(paper["license"]) if paper.get("license") else "licence not recorded"
        lines.append(f"- {who}. *{paper.get('title')}*. {paper.get('citation') or 'Quantum'} {ref} ({lic})")
    return lines + [""]


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
    tr = inp.metrics.get("train") or {}
    if isinstance(tr.get("gate_known"), int):  # train held these out of the pairs above to calibrate its gate
        titles = (f"; declines a question quoting a title not among its {tr['gate_papers']} trained papers'"
                  if "gate_papers" in tr else "")
        rows.append(f"| held back for the confidence gate (not trained on) | {tr['gate_known']} wordings of known "
                    f"facts + {tr['gate_unknown']} questions about unknown papers; min_prob {tr.get('gate_min_prob')}"
                    f"{titles} |")
    seen = val["seen"]
    rows.append(f"| seen questions (scored, never trained on) | {seen.get('rows_out')} kept of "
                f"{seen.get('rows_in')} ({seen.get('rows_quarantined')} quarantined) |")
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
    seen_n = val["seen"].get("rows_out")
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
              "model.resize_token_embeddings(len(tokenizer))  # qrb.model.resize_for_tokenizer does it the same way",
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
          "answer as `qrb ask --rag` does and cite the excerpts their answer names ([n]): recall@k is the share of "
          "questions whose paper is among the passages shown, citation accuracy the share of attempted answers whose "
          "first cited paper is the question's (citing nothing counts as wrong).", "",
          "**In short:** " + in_short(ev), ""]
    L += evaluation_section(ev, b.name)
    L += compute_and_lineage(inp)
    L += attribution(inp.papers, p.license)
    return str(ModelCard(f"---\n{metadata(inp, p, peft_lib)}\n---\n\n" + "\n".join(L)))
