"""Model-card stage: the adapter's README.md, written from the pipeline's own outputs (no hand-typed numbers).

    python -m stages.model_card       # from the repository (or workspace) root, after evaluate

Reads  params.yaml (`model_card:`, base.model/system_prompt), reports/{scrape,generate,validate,train,evaluate}.json,
       artifacts/train/adapter/lineage.json (base model, hyper-parameters, hardware, wall time, commit, data hashes),
       dvclive/plots/metrics/{,eval/}loss.tsv (the loss curves), artifacts/validate/{train,eval}.jsonl (the kept
       pairs: their generator model, prompt, paper, fact and variant), artifacts/scrape/papers.jsonl (authors, DOIs
       and licences of those papers, for the CC BY 4.0 attribution), dvc.lock (data hashes of the stages before),
       and, when the base model is a local folder, its README.md, PROVENANCE.json and config.json (what the base
       is: a real model converted from where, under which licence, or an offline stand-in; whether it ties its
       embeddings).
Writes artifacts/model_card/README.md (a `huggingface_hub.ModelCard`: YAML metadata with base_model, datasets,
       licence and a model-index of the evaluation results + Markdown) and artifacts/model_card/loss.png (the loss
       curve; with no matplotlib the card carries the loss as a table instead). The export stage copies both next
       to the adapter.

Every number in the card is read from those files; what the pipeline did not measure (e.g. energy, when train ran
without codecarbon) is stated as not measured, never estimated by hand. The card says what the model is: a base
whose README calls it a stand-in, or pairs written by the extractive smoke-test endpoint (its model id and
fingerprint), make the card a pipeline test, not a model to use. The evaluation section says in words, from the
numbers, how often fine-tuned is correct against its base (seen papers) and how often it declines where it cannot
know (held-out and invented papers), where it is above or below its base on the other metrics and whether the
intervals overlap, so that a style gain (ROUGE with shorter answers) cannot pass for knowledge.

Modules: `inputs` (reading the files; what the base and the generator are), `evaluation` (the metric tables and
the findings in words), `render` (the other sections and the whole card), `run` (the files out).
"""

from __future__ import annotations

from dataclasses import dataclass

SECTION = "model_card"
BASE_KEYS = ("model", "system_prompt")


@dataclass(frozen=True)
class ModelCardParams:
    title: str
    license: str  # the adapter's license id on the Hub (e.g. llama3.1 for a Llama 3.1 derivative)
    base_license: str | None  # the base model's; null = its folder's PROVENANCE.json says (must agree when both do)
    datasets: tuple[str, ...]  # Hub ids of the training data if published; () = the workspace's dataset path
    language: tuple[str, ...]

    def check(self) -> None:
        if not self.title.strip() or not self.license.strip():
            raise ValueError("params: `model_card.title` and `model_card.license` must not be empty")
        if self.base_license is not None and not self.base_license.strip():
            raise ValueError("params: `model_card.base_license` must be a licence id or null (read from the base "
                             "model's PROVENANCE.json)")
        if any(not d.strip() for d in self.datasets):
            raise ValueError("params: `model_card.datasets` entries must not be empty")


PARAMS_CLASS = ModelCardParams
