"""The run's rounds of requests (`rounds`: the order `run` follows) and what they will send and cost, before anything
is sent (`plan`: `--dry-run`, the budget check): the QA requests exactly, and the fact-level rounds (augment,
paraphrase, invent) exactly where the replies they depend on are cached, else estimated from the QA requests still to
answer (each assumed to yield `pairs_per_prompt` facts). Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator
from typing import Any

from qrb import llm

from . import AUGMENT, INVENT, PARAPHRASE, GenerateParams
from .assemble import collect_facts, with_variants
from .facts import INVENT_PER_REQUEST, augment_units, invent_units, paraphrase_units, seen_sample, with_spare
from .replies import parse_pairs
from .units import EST_OUTPUT_TOKENS_PER_PAIR, Unit, estimate, priced

EST_PAIR_CHARS = 450      # a pair (question + answer) with its title and DOI lines, for the estimate
EST_QUESTION_CHARS = 120  # one more question on a paraphrase request's Asked lines


@dataclasses.dataclass
class Round:
    name: str
    exact: bool           # False: the count and tokens are estimated (the replies it depends on are not cached)
    est: dict[str, Any]   # `units.estimate` of the round


def rounds(units: list[Unit], responses: dict[str, dict[str, Any]], p: GenerateParams, seed: int, system: str,
           fact_templates: dict[str, str], papers: list[dict[str, Any]], planning: bool = False
           ) -> Generator[tuple[str, list[Unit], int], None, tuple[list[Unit], list[Unit], list[Unit]]]:
    """The run's rounds in order, each (name, its units, pairs a reply holds): the QA round, then the augment and
    paraphrase rounds built from its facts, then the invented papers. The caller puts a round's replies in
    `responses` before it asks for the next round. Returns (augment, paraphrase, invent) units. `planning`: augment
    replies not yet cached count as K rows a fact (the run counts the rows it got: a failed augment adds none)."""
    yield "qa", units, p.facts_asked
    facts = collect_facts(units, responses, p, seed)
    aug = augment_units(facts.train, fact_templates.get(AUGMENT, ""), system, p, seed)
    if aug:
        yield AUGMENT, aug, p.augment_variants - 1
    train, _ = with_variants(facts, aug, responses, p)
    para: list[Unit] = []
    if p.seen_questions > 0:
        para = paraphrase_units(seen_sample(facts.train, p.seen_questions, seed), train, fact_templates[PARAPHRASE],
                                system, p, seed)
        yield PARAPHRASE, para, 1
    n_rows = len(train)
    if planning and not all(u.key in responses for u in aug):
        n_rows = len(facts.train) * p.augment_variants
    held = {f["doi"] for f in facts.eval}
    inv = invent_units([pp for pp in papers if pp.get("doi") not in held], p.invented_questions,
                       with_spare(round(p.abstain_share * n_rows)), fact_templates.get(INVENT, ""), system, p, seed)
    if inv:
        yield INVENT, inv, INVENT_PER_REQUEST
    return aug, para, inv


def _synthetic(name: str, n: int, p: GenerateParams, system: str, template: str) -> dict[str, Any]:
    """An estimate for `n` fact-level requests whose facts are not known yet."""
    chars = EST_PAIR_CHARS + (0 if name == AUGMENT else p.augment_variants * EST_QUESTION_CHARS)
    pairs = p.augment_variants - 1 if name == AUGMENT else 1
    prompt = llm.count(system + template, p.model) + llm.estimate("x" * chars) + 8
    out = min(p.max_tokens, pairs * EST_OUTPUT_TOKENS_PER_PAIR + 20)
    return priced(n, n, n * prompt, n * out, p)


def plan(units: list[Unit], fetch: Callable[[set[str]], dict[str, dict[str, Any]]], cached: set[str],
         p: GenerateParams, seed: int, system: str, fact_templates: dict[str, str],
         papers: list[dict[str, Any]] = ()) -> list[Round]:
    """The rounds of the run with their estimates. `fetch(keys)` = the cached replies of those keys."""
    out = [Round("qa", True, estimate(units, cached, p))]
    known = fetch({u.key for u in units}) if cached else {}
    if all(u.key in known for u in units):  # the rounds as the run will build them, from the cached replies
        later = rounds(units, known, p, seed, system, fact_templates, list(papers), planning=True)
        next(later)
        exact = True
        for name, round_units, _ in later:
            out.append(Round(name, exact, estimate(round_units, cached if exact else set(), p)))
            known.update(fetch({u.key for u in round_units}))
            # the later rounds read the augment replies (the Asked lines, the rows): unknown, they are estimates
            exact = exact and (name != AUGMENT or all(u.key in known for u in round_units))
        return out
    n_facts = sum(min(len(parse_pairs(known[u.key]["content"])), p.pairs_per_prompt) if u.key in known
                  else p.pairs_per_prompt for u in units)
    train_facts = max(0, n_facts - p.eval_size)
    if p.augment_variants > 1:
        out.append(Round(AUGMENT, False, _synthetic(AUGMENT, train_facts, p, system, fact_templates[AUGMENT])))
    if p.seen_questions > 0:
        n = min(p.seen_questions, train_facts)
        out.append(Round(PARAPHRASE, False, _synthetic(PARAPHRASE, n, p, system, fact_templates[PARAPHRASE])))
    n_abstain = round(p.abstain_share * train_facts * p.augment_variants)
    if n_abstain + p.invented_questions:
        inv = invent_units(list(papers), p.invented_questions, with_spare(n_abstain), fact_templates.get(INVENT, ""),
                           system, p, seed)
        out.append(Round(INVENT, False, estimate(inv, set(), p)))
    return out


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
