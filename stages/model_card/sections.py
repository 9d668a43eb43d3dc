"""The card's record sections: training procedure (with how the embeddings train on a tied base), loss curve,
compute, lineage, and the licence and attribution of every paper used (pure functions of the inputs)."""

from __future__ import annotations

from typing import Any

from .inputs import NOT_DATA, CardInputs

LOSS_PNG_NAME = "loss.png"
METHOD_NAMES = {"lora": "LoRA", "lora_plus": "LoRA+", "dora": "DoRA", "qlora": "QLoRA", "loreft": "LoReFT"}
NAME_SUFFIXES = {"jr", "sr", "ii", "iii", "iv"}  # "Smith, Jr." is no "Last, First"


def fmt(value: Any, decimals: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


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


def fmt_int(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else fmt(value, 1)


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
    rows: list[tuple[str, Any]] = [("method", METHOD_NAMES.get(train.get("method"), train.get("method")))]
    method = train.get("method")
    if method == "loreft" and isinstance(train.get("loreft"), dict):
        rows += [(f"loreft.{k}", v) for k, v in train["loreft"].items()]
    elif isinstance(train.get("lora"), dict):
        rows += [(f"lora.{k}", v) for k, v in train["lora"].items()]
    if method == "lora_plus":
        rows.append(("loraplus_lr_ratio", train.get("loraplus_lr_ratio")))
    for key in ("learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
                "neftune_noise_alpha", "batch_size", "grad_accum", "epochs", "precision", "pad_token",
                "padding_side", "completion_only_loss", "max_length", "group_by_length"):
        if key in train:
            rows.append((key, train[key]))
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
             f"- **Tokens seen:** {fmt_int(lin.get('tokens_seen') or tr.get('tokens_seen'))}",
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
