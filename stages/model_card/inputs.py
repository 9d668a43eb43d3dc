"""What the card is filled from: the pipeline's output files, and what they say the base model and the generator
are (read, never assumed from a profile's name)."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError, DataError
from qrb.io import read_jsonl
from qrb.params import read_yaml

from . import ModelCardParams

log = logging.getLogger(__name__)

# the stages' full records (metrics/<stage>.json holds only their headline numbers)
METRICS = {name: Path(f"reports/{name}.json") for name in ("scrape", "generate", "validate", "train", "evaluate")}
LINEAGE = Path("artifacts/train/adapter/lineage.json")
# DVCLive's history of each logged value (train writes it): tab-separated step and value columns
LOSS_CSV = {"train": Path("dvclive/plots/metrics/loss.tsv"), "eval": Path("dvclive/plots/metrics/eval/loss.tsv")}
PAPERS = Path("artifacts/scrape/papers.jsonl")
PAIRS = {"train": Path("artifacts/validate/train.jsonl"), "eval": Path("artifacts/validate/eval.jsonl")}
DATASET = "artifacts/validate/dataset"  # the training set as DVC tracks it (its md5 is in the Lineage table)
DVC_LOCK = Path("dvc.lock")
NOT_DATA = ("metrics/", "cache/", "reports/", "plots/")  # outs that are not data (the lineage table skips them)
# How the offline smoke-test endpoint labels every reply: its model id and a word of its `system_fingerprint`
# (standins/smoke; a stage may not import standins, so the label is repeated here and a test keeps it equal).
SMOKE_MARKERS = ("qrb-smoke-extractive", "smoke-test")
STAND_IN_WORDS = ("stand-in", "stands in for", "stand in for")  # what a stand-in's README says of itself


@dataclass(frozen=True)
class BaseInfo:
    """What the base model is, from its folder (README.md, PROVENANCE.json, config.json) or its Hub id."""

    ref: str  # base.model as train loaded it: a Hub id or a local folder
    local: bool
    name: str  # e.g. SmolLM2-135M-Instruct (PROVENANCE.json), else `ref`
    hub_id: str | None  # the Hub id it derives from (metadata base_model), when known
    license: str | None
    provenance: dict[str, Any] = field(default_factory=dict)
    readme: str | None = None  # the first paragraph of its README (no heading)
    stand_in: bool = False  # its README says it stands in for a real model
    tied: bool | None = None  # tie_word_embeddings of its config; None = not known here


@dataclass(frozen=True)
class GeneratorInfo:
    """Who wrote the pairs, from the pairs themselves (model id, and system_fingerprint where recorded)."""

    label: str  # the model ids, each once
    smoke: bool  # every pair's model id or fingerprint carries the smoke endpoint's label


@dataclass
class CardInputs:
    """Everything the card is filled from (read by `read_inputs`, or built by a test)."""

    metrics: dict[str, dict[str, Any]]
    lineage: dict[str, Any]
    loss: dict[str, list[tuple[float, float]]]
    papers: list[dict[str, Any]]  # the papers the kept pairs came from
    pairs: dict[str, list[dict[str, Any]]]  # the validated pairs by split (train, eval)
    data_hashes: dict[str, str]  # path -> md5, from dvc.lock
    base: BaseInfo
    generator: GeneratorInfo


def read_loss(path: Path) -> list[tuple[float, float]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        return [(float(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg})") from None


def describe_base(ref: str, license_param: str | None) -> BaseInfo:
    """What `ref` is. A local folder speaks for itself (PROVENANCE.json: the source and licence of a converted
    model; README.md: a stand-in says so); a Hub id is the model, its licence the param's."""
    folder = Path(ref)
    if not folder.is_dir():  # its config.json if the local HF cache holds it (never a download: the card runs offline)
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
        except Exception:  # an id the cache cannot hold (a malformed name): nothing known
            cached = None
        tied = _json(Path(cached)).get("tie_word_embeddings") if isinstance(cached, str) else None
        return BaseInfo(ref=ref, local=False, name=ref, hub_id=ref, license=license_param,
                        tied=tied if isinstance(tied, bool) else None)
    prov = _json(folder / "PROVENANCE.json") if (folder / "PROVENANCE.json").exists() else {}
    readme = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").exists() else ""
    paragraphs = [" ".join(p.split()) for p in readme.split("\n\n")]  # the first without a heading is quoted
    config = _json(folder / "config.json") if (folder / "config.json").exists() else {}
    recorded = prov.get("license")
    if recorded and license_param and recorded.lower() != license_param.lower():
        raise ConfigError(f"model_card.base_license is {license_param!r} but {folder / 'PROVENANCE.json'} says "
                          f"{recorded!r}: set it to null (the provenance decides) or to {recorded!r}")
    name = prov.get("model") or ref
    hub_id = f"{prov['author']}/{prov['model']}" if prov.get("author") and prov.get("model") else None
    tied = config.get("tie_word_embeddings", prov.get("tie_word_embeddings"))
    return BaseInfo(ref=ref, local=True, name=name, hub_id=hub_id, license=recorded or license_param,
                    provenance=prov, readme=next((p for p in paragraphs if p and not p.startswith("#")), None),
                    stand_in=any(w in readme.lower() for w in STAND_IN_WORDS),
                    tied=tied if isinstance(tied, bool) else None)


def describe_generator(pairs: list[dict[str, Any]]) -> GeneratorInfo:
    models = dict.fromkeys(str(r["model"]) for r in pairs if r.get("model"))  # each id once, in order
    label = ", ".join(f"`{m}`" for m in models) or "an unknown generator (the pairs carry no model id)"
    marks = [f"{r.get('model') or ''} {r.get('system_fingerprint') or ''}" for r in pairs]
    return GeneratorInfo(label, smoke=bool(pairs) and all(any(m in x for m in SMOKE_MARKERS) for x in marks))


def data_hashes() -> dict[str, str]:
    lock = (read_yaml(DVC_LOCK).get("stages") or {}) if DVC_LOCK.exists() else {}
    return {out["path"]: out.get("md5") or out.get("hash") for stage in ("scrape", "generate", "validate", "train")
            for out in (lock.get(stage) or {}).get("outs", []) if not out["path"].startswith(NOT_DATA)}


def read_inputs(base: dict[str, Any], p: ModelCardParams) -> CardInputs:
    missing = [str(x) for x in (*METRICS.values(), LINEAGE, PAPERS) if not x.exists()]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: run the pipeline up to evaluate first "
                         "(dvc repro evaluate)")
    metrics = {name: _json(path) for name, path in METRICS.items()}
    if not isinstance(metrics["validate"].get("seen"), dict):  # validate writes it since its seen-questions set
        raise ConfigError(f"{METRICS['validate']} has no `seen` record (an older validate): rerun `dvc repro validate`")
    lineage = _json(LINEAGE)
    pairs = {split: list(read_jsonl(path)) if path.exists() else [] for split, path in PAIRS.items()}
    every = pairs["train"] + pairs["eval"]
    used = {r.get("doi") for r in every} - {None}
    papers = [x for x in read_jsonl(PAPERS) if not used or x.get("doi") in used]
    return CardInputs(metrics=metrics, lineage=lineage, loss={k: read_loss(x) for k, x in LOSS_CSV.items()},
                      papers=papers, pairs=pairs, data_hashes=data_hashes(),
                      base=describe_base(lineage.get("base_model") or base["model"], p.base_license),
                      generator=describe_generator(every))
