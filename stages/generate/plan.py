"""What a run will send and cost, before anything is sent (`--dry-run`, the budget check): the QA requests exactly,
and the fact-level rounds (augment, paraphrase) exactly where the replies they depend on are cached, else estimated
from the QA requests still to answer (each assumed to yield `pairs_per_prompt` facts). Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qrb import llm

from . import AUGMENT, INVENT, PARAPHRASE, GenerateParams
from .assemble import collect_facts, with_variants
from .facts import INVENT_PER_REQUEST, augment_units, invent_units, paraphrase_units, seen_sample, with_spare
from .replies import parse_pairs
from .units import EST_OUTPUT_TOKENS_PER_PAIR, Unit, cost_usd, est_tokens, estimate, mode_factor

EST_PAIR_CHARS = 450      # a pair (question + answer) with its title and DOI lines, for the estimate
EST_QUESTION_CHARS = 120  # one more question on a paraphrase request's Asked lines


@dataclasses.dataclass
class Round:
    name: str
    exact: bool           # False: the count and tokens are estimated (the replies it depends on are not cached)
    est: dict[str, Any]   # `units.estimate` of the round


def _synthetic(name: str, n: int, p: GenerateParams, system: str, template: str) -> dict[str, Any]:
    """An estimate for `n` fact-level requests whose facts are not known yet."""
    if name == AUGMENT:
        prompt = est_tokens(system + template, p.model) + llm.estimate("x" * EST_PAIR_CHARS) + 8
        out = min(p.max_tokens, (p.augment_variants - 1) * EST_OUTPUT_TOKENS_PER_PAIR + 20)
    else:
        chars = EST_PAIR_CHARS + p.augment_variants * EST_QUESTION_CHARS
        prompt = est_tokens(system + template, p.model) + llm.estimate("x" * chars) + 8
        out = min(p.max_tokens, EST_OUTPUT_TOKENS_PER_PAIR + 20)
    pt, ct = n * prompt, n * out
    return {"requests": n, "requests_cached": 0, "requests_to_send": n, "est_prompt_tokens": pt,
            "est_completion_tokens": ct, "est_cost_usd": round(cost_usd(pt, ct, p, mode_factor(p)), 6),
            "worst_case_cost_usd": round(cost_usd(pt, n * p.max_tokens, p, mode_factor(p)), 6)}


def _invent_round(n_rows: int, p: GenerateParams, papers: list[dict[str, Any]], system: str,
                  fact_templates: dict[str, str], seed: int, cached: set[str], exact: bool) -> list[Round]:
    n_abstain = round(p.abstain_share * n_rows)
    if n_abstain + p.invented_questions == 0:
        return []
    units = invent_units(papers, p.invented_questions, with_spare(n_abstain), fact_templates.get(INVENT, ""), system,
                         p, seed)
    return [Round(INVENT, exact, estimate(units, cached if exact else set(), p))]


def plan(units: list[Unit], fetch: Callable[[set[str]], dict[str, dict[str, Any]]], cached: set[str],
         p: GenerateParams, seed: int, system: str, fact_templates: dict[str, str],
         papers: list[dict[str, Any]] = ()) -> list[Round]:
    """The rounds of the run with their estimates. `fetch(keys)` = the cached replies of those keys."""
    rounds = [Round("qa", True, estimate(units, cached, p))]
    want_aug, want_para = p.augment_variants > 1, p.seen_questions > 0
    if not (want_aug or want_para):
        return rounds + _invent_round(len(units) * p.pairs_per_prompt, p, list(papers), system, fact_templates, seed,
                                      cached, False)
    known = fetch({u.key for u in units}) if cached else {}
    if all(u.key in known for u in units):
        facts = collect_facts(units, known, p, seed)
        aug = augment_units(facts.train, fact_templates.get(AUGMENT, ""), system, p, seed)
        if want_aug:
            rounds.append(Round(AUGMENT, True, estimate(aug, cached, p)))
        known.update(fetch({u.key for u in aug}))
        train, _ = with_variants(facts, aug, known, p)
        exact = all(u.key in known for u in aug)  # else the Asked lines, hence the keys, are not known yet
        if want_para:
            para = paraphrase_units(seen_sample(facts.train, p.seen_questions, seed), train,
                                    fact_templates[PARAPHRASE], system, p, seed)
            rounds.append(Round(PARAPHRASE, exact, estimate(para, cached if exact else set(), p)))
        n_rows = len(train) if exact else len(facts.train) * p.augment_variants
        held = {f["doi"] for f in facts.eval}
        return rounds + _invent_round(n_rows, p, [pp for pp in papers if pp.get("doi") not in held], system,
                                      fact_templates, seed, cached, exact)
    n_facts = sum(min(len(parse_pairs(known[u.key]["content"])), p.pairs_per_prompt) if u.key in known
                  else p.pairs_per_prompt for u in units)
    train_facts = max(0, n_facts - p.eval_size)
    if want_aug:
        rounds.append(Round(AUGMENT, False, _synthetic(AUGMENT, train_facts, p, system, fact_templates[AUGMENT])))
    if want_para:
        n = min(p.seen_questions, train_facts)
        rounds.append(Round(PARAPHRASE, False, _synthetic(PARAPHRASE, n, p, system, fact_templates[PARAPHRASE])))
    return rounds + _invent_round(train_facts * p.augment_variants, p, list(papers), system, fact_templates, seed,
                                  cached, False)


def total(rounds: list[Round]) -> dict[str, Any]:
    keys = ("requests", "requests_cached", "requests_to_send", "est_prompt_tokens", "est_completion_tokens")
    out: dict[str, Any] = {k: sum(r.est[k] for r in rounds) for k in keys}
    for k in ("est_cost_usd", "worst_case_cost_usd"):
        out[k] = round(sum(r.est[k] for r in rounds), 6)
    return out


def describe(rounds: list[Round], p: GenerateParams, n_papers: int) -> str:
    """The summary `--dry-run` prints (and a run logs): one line per round, then the total against the budget."""
    t = total(rounds)
    lines = [f"generate: {n_papers} papers x {len(p.prompts)} prompts -> {t['requests']} requests "
             f"({t['requests_cached']} cached, {t['requests_to_send']} to send) to {p.model} at {p.base_url}; "
             + (f"mode batch: the Batch API at {p.batch_price_factor:g} x the online price" if p.mode == "batch"
                else "mode online") + f"; prompt tokens counted by {llm.counter(p.model)[0]}"]
    what = {"qa": "QA pairs", AUGMENT: f"augment: {p.augment_variants - 1} rewordings per training fact "
                                          f"(augment_variants {p.augment_variants})",
            PARAPHRASE: f"paraphrase: a new question for up to {p.seen_questions} training facts (seen_questions)",
            INVENT: f"invent: {INVENT_PER_REQUEST} invented papers a request, abstention rows "
                    f"(abstain_share {p.abstain_share:g}) + the invented set ({p.invented_questions})"}
    for r in rounds:
        e, approx = r.est, "" if r.exact else "~"
        note = "" if r.exact else " (estimated: the replies it depends on are not cached yet)"
        lines.append(f"  {r.name:<10} {approx}{e['requests']} requests ({e['requests_cached']} cached, "
                     f"{approx}{e['requests_to_send']} to send), {approx}{e['est_prompt_tokens']} prompt + "
                     f"{approx}{e['est_completion_tokens']} completion tokens = ${e['est_cost_usd']:.4f}  "
                     f"[{what[r.name]}]{note}")
    lines.append(f"  estimated {t['est_prompt_tokens']} prompt + {t['est_completion_tokens']} completion tokens = "
                 f"${t['est_cost_usd']:.4f} (worst case at max_tokens ${t['worst_case_cost_usd']:.4f}); "
                 f"limit generate.max_cost_usd = ${p.max_cost_usd:.4f}")
    return "\n".join(lines)
