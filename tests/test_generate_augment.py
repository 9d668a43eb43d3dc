"""Knowledge augmentation and "seen papers, new questions" in the generate stage: K variants per training fact,
variants deduplicated across facts only, eval holding variant 0, the seen questions (never near-duplicates of a
training question, never trained on), the cache and `--dry-run` covering the new requests."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from generate_helpers import KEY_ENV, MARKER, ROOT, fake_papers, make_workspace, outputs, read, recipe, run_main

from qrb.schema import PAIR_FIELDS
from qrb.words import word_set
from stages.generate.assemble import assemble, collect_facts, dedup_questions, with_variants
from stages.generate.facts import augment_units, paraphrase_units, seen_sample
from stages.generate.plan import plan
from stages.generate.run import load_fact_templates, load_templates
from stages.generate.units import build_units, unit_failure
from standins.smoke import MODEL_ID, Faults, completion, serve_smoke_endpoint

K, SEEN = 4, 12


def jaccard(a: str, b: str) -> float:
    x, y = word_set(a), word_set(b)
    return len(x & y) / len(x | y)


def numbers(text: str) -> set[str]:
    return set(re.findall(r"\d+(?:[.,]\d+)*", text))


def answered(units) -> dict:
    """Each unit answered by the smoke endpoint's writer, as the cache would hold it."""
    return {u.key: {"response_id": f"chatcmpl-{i}", "model": MODEL_ID, "finish_reason": "stop", "prompt_tokens": 50,
                    "completion_tokens": 20,
                    "content": completion({"model": MODEL_ID, "messages": u.messages})["choices"][0]["message"]
                    ["content"]} for i, u in enumerate(units)}


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    """One stage run with K variants and SEEN seen questions on the smoke endpoint, then a rerun."""
    mp = pytest.MonkeyPatch()
    try:
        with serve_smoke_endpoint(port=0) as ep:
            ws = make_workspace(tmp_path_factory.mktemp("aug") / "ws", ep.base_url, augment_variants=K,
                                seen_questions=SEEN, max_cost_usd=50.0)
            run_main(ws, mp)
            first_run = ep.completions_count()
            first = outputs(ws)
            run_main(ws, mp)
            rerun = ep.completions_count() - first_run
        yield {"ws": ws, "requests": first_run, "rerun_requests": rerun, "first": first, "second": outputs(ws),
               "metrics": json.loads((ws / "reports/generate.json").read_text()),
               "train": read(ws / "artifacts/generate/train.jsonl"), "eval": read(ws / "artifacts/generate/eval.jsonl"),
               "seen": read(ws / "artifacts/generate/seen.jsonl")}
    finally:
        mp.undo()


def test_every_training_fact_in_k_distinct_wordings_with_its_facts_kept(augmented):
    train = augmented["train"]
    assert all(set(r) == set(PAIR_FIELDS) for r in train)
    by_fact = collections.defaultdict(list)
    for r in train:
        by_fact[r["fact_id"]].append(r)
    full = [rows for rows in by_fact.values() if len(rows) == K]
    m = augmented["metrics"]
    # a missing variant is accounted for (as another fact's duplicate: the fake papers share their topics a lot)
    assert len(full) >= 0.75 * len(by_fact)
    missing = (K - 1) * len(by_fact) - m["variants"]
    assert missing == m["variants_duplicates"] + m["variants_repeated"] + m["variants_lost_facts"]
    for rows in by_fact.values():
        v0 = rows[0]
        assert [r["variant"] for r in rows] == list(range(len(rows))) and v0["prompt_id"] != "augment"
        assert v0["fact_id"] == hashlib.sha256((v0["doi"] + v0["question"]).encode()).hexdigest()[:16]
        assert len({r["question"] for r in rows}) == len(rows)  # distinct wordings
        assert {(r["doi"], r["chunk"]) for r in rows} == {(v0["doi"], v0["chunk"])}
        for r in rows[1:]:
            assert r["prompt_id"] == "augment" and numbers(v0["answer"]) <= numbers(r["answer"])
    # the smoke endpoint rewords the answers of variants 2 and 4 of every 5: of K=4, variant 2
    assert [[r["variant"] for r in rows if r["answer"] != rows[0]["answer"]] for rows in full] == [[2]] * len(full)
    assert m["train_facts"] == len(by_fact) and m["variants"] == len(train) - len(by_fact)
    assert m["requests_by_kind"]["augment"]["requests"] == m["train_facts"] and m["augment_variants"] == K


def test_eval_holds_variant_0_of_held_out_papers_only(augmented):
    train, evals = augmented["train"], augmented["eval"]
    assert evals and all(r["variant"] == 0 and r["prompt_id"] != "augment" for r in evals)
    assert len({r["fact_id"] for r in evals}) == len(evals)
    assert not {r["doi"] for r in train} & {r["doi"] for r in evals}  # a fact's variants stay with its paper
    assert not {r["fact_id"] for r in train} & {r["fact_id"] for r in evals}


def test_seen_questions_are_new_never_trained_and_reference_the_fact(augmented):
    train, seen, m = augmented["train"], augmented["seen"], augmented["metrics"]
    threshold = recipe().seen_max_jaccard
    assert m["seen_requested"] == SEEN == m["seen_kept"] + m["seen_dropped_near_duplicate"] + m["seen_failed"]
    assert len(seen) == m["seen_kept"] >= SEEN - 2
    v0 = {r["fact_id"]: r for r in train if r["variant"] == 0}
    train_questions = {r["question"] for r in train}
    for row in seen:
        assert row["question"] not in train_questions
        assert max(jaccard(row["question"], q) for q in train_questions) < threshold
        fact = v0[row["fact_id"]]
        assert (row["answer"], row["source_question"], row["doi"]) == (fact["answer"], fact["question"], fact["doi"])
        assert row["variant"] == 0 and row["prompt_id"] == "paraphrase" and row["model"] == MODEL_ID
        assert set(row) == set(PAIR_FIELDS) | {"source_question"}
    train_papers = {r["doi"] for r in train}
    assert len({r["doi"] for r in seen}) == min(len(seen), len(train_papers))  # one fact per train paper in turn


def test_rerun_sends_no_request_of_any_kind_and_reproduces_the_outputs(augmented):
    m = augmented["metrics"]
    assert augmented["requests"] == m["requests"] == sum(k["requests"] for k in m["requests_by_kind"].values())
    assert augmented["rerun_requests"] == 0 and augmented["second"] == augmented["first"]
    assert m["this_run"]["api_requests"] == 0 and m["this_run"]["requests_from_cache"] == m["requests"]


def test_variants_are_not_deduplicated_against_each_other_but_across_facts():
    q = "What threshold does the surface code decoder reach under circuit-level noise?"
    rows = [{"question": q, "fact_id": "a"},
            {"question": q.replace("What", "Which"), "fact_id": "a"},        # near: a variant of the same fact
            {"question": q.replace("threshold", "cutoff"), "fact_id": "a"},
            {"question": q.replace("What", "So what"), "fact_id": "b"},      # near: another fact's question
            {"question": q.lower(), "fact_id": "c"},                          # exact, another fact
            {"question": "How is magic state distillation overhead reduced?", "fact_id": "d"}]
    kept, n_exact, n_near = dedup_questions(rows, 0.8)
    assert [r["fact_id"] for r in kept] == ["a", "a", "a", "d"] and (n_exact, n_near) == (1, 1)


def augment_round(p, n_papers: int):
    """QA replies for the first papers, their facts, and the augment requests for the training facts."""
    system, templates = load_templates(p.prompts, ROOT / "prompts")
    fact_templates = load_fact_templates(p, ROOT / "prompts")
    units, _ = build_units(fake_papers()[:n_papers], templates, system, p, 1)
    responses = answered(units)
    facts = collect_facts(units, responses, p, 1)
    return system, fact_templates, units, responses, facts, augment_units(facts.train, fact_templates["augment"], system, p, 1)


def test_a_variant_duplicating_another_facts_question_is_removed_and_a_failed_augment_keeps_variant_0():
    p = recipe(augment_variants=3, seen_questions=4, eval_size=0)
    system, fact_templates, units, responses, facts, aug = augment_round(p, 3)
    assert len(aug) == len(facts.train) and all(u.fact_id for u in aug)
    lost, planted = aug[0], aug[1]
    responses.update(answered(aug[1:]))
    # plant: the second fact's reply rewords it into the third fact's question (a duplicate across facts)
    other = facts.train[2]["question"]
    responses[planted.key] = {**responses[planted.key], "content": json.dumps({"pairs": [
        {"question": other, "answer": facts.train[1]["answer"]},
        {"question": "Which wholly new wording asks for this fact?", "answer": facts.train[1]["answer"]}]})}
    train, counts = with_variants(facts, aug, responses, p)
    by_fact = collections.Counter(r["fact_id"] for r in train)
    assert by_fact[lost.fact_id] == 1  # the failed augment: variant 0 only
    assert by_fact[planted.fact_id] == 2 and counts["variants_duplicates"] >= 1  # the new wording kept
    assert [r["question"] for r in train].count(other) == 1  # the duplicate of another fact's question removed
    failure = unit_failure(lost, "HTTP 500 server error: boom", 6)
    out = assemble(units, responses, [failure], p, 1, n_papers=3, cached=set(), this_run={}, estimated_cost_usd=0,
                   augment=aug)
    assert out.train == train and failure in out.failures and failure["prompt_id"] == "augment"
    assert failure["fact_id"] == lost.fact_id
    assert out.metrics["requests_by_kind"]["augment"]["failed"] == 1


def test_seen_sample_is_seeded_and_spreads_over_train_papers():
    facts = [{"doi": f"d{i}", "fact_id": f"f{i}-{j}"} for i in range(5) for j in range(4)]
    sample = seen_sample(facts, 7, seed=3)
    assert len(sample) == 7 and sample == seen_sample(facts, 7, seed=3)
    assert len({f["doi"] for f in sample[:5]}) == 5  # every paper once before any twice
    assert sample != seen_sample(facts, 7, seed=4) and len(seen_sample(facts, 99, seed=3)) == 20


def test_paraphrase_request_lists_every_training_question_of_the_fact():
    p = recipe(augment_variants=3, seen_questions=2)
    system, fact_templates, units, responses, facts, aug = augment_round(p, 2)
    responses.update(answered(aug))
    train, _ = with_variants(facts, aug, responses, p)
    (unit,) = paraphrase_units(facts.train[:1], train, fact_templates["paraphrase"], system, p, 1)
    user = unit.messages[1]["content"]
    assert user.startswith("Task: paraphrase") and user.count("<paper>") == 1 and user.count("</paper>") == 1
    assert [q for q in re.findall(r"^Asked: (.*)$", user, re.M)] == [r["question"] for r in train
                                                                      if r["fact_id"] == unit.fact_id]


def test_dry_run_counts_and_prices_augment_and_paraphrase_requests(tmp_path, monkeypatch, capsys):
    with serve_smoke_endpoint(port=0) as ep:
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:8], augment_variants=K,
                            seen_questions=5, eval_size=10)
        run_main(ws, monkeypatch, "--dry-run")
        out = capsys.readouterr().out
        qa = 8 * 5
        assert f"qa         {qa} requests (0 cached, {qa} to send)" in out
        est_facts = qa * 3 - 10
        assert f"augment    ~{est_facts} requests" in out and "paraphrase ~5 requests" in out and "estimated" in out
        costs = [float(c) for c in re.findall(r"tokens = \$(\d+\.\d+)", out)]  # qa, augment, paraphrase, total
        assert len(costs) == 4 and all(c > 0 for c in costs) and costs[3] == pytest.approx(sum(costs[:3]), abs=1e-3)
        assert ep.request_count == 0 and not (ws / "cache").exists()
        run_main(ws, monkeypatch)
        sent = ep.completions_count()
        m = json.loads((ws / "reports/generate.json").read_text())
        run_main(ws, monkeypatch, "--dry-run")
        out = capsys.readouterr().out
    aug = m["requests_by_kind"]["augment"]["requests"]
    assert f"augment    {aug} requests ({aug} cached, 0 to send)" in out  # exact once the QA replies are cached
    assert "paraphrase 5 requests (5 cached, 0 to send)" in out and f"-> {sent} requests ({sent} cached" in out


@pytest.mark.slow
def test_kill_9_during_augmentation_then_resume_repeats_no_request(tmp_path, monkeypatch):
    concurrency, extra = 2, {"augment_variants": 3, "seen_questions": 6}
    with serve_smoke_endpoint(port=0, faults=Faults(latency_s=0.03)) as ep:
        ref = make_workspace(tmp_path / "ref", ep.base_url, papers=fake_papers()[:10], concurrency=concurrency,
                             **extra)
        run_main(ref, monkeypatch)
        uninterrupted = ep.completions_count()
        qa = 10 * 5
        ws = make_workspace(tmp_path / "ws", ep.base_url, papers=fake_papers()[:10], concurrency=concurrency, **extra)
        env = {**os.environ, KEY_ENV: MARKER}
        before = ep.completions_count()
        proc = subprocess.Popen([sys.executable, "-m", "stages.generate"], cwd=ws, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while ep.completions_count() - before < qa + (uninterrupted - qa) // 2:  # half way through augmenting
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (ws / "artifacts/generate/train.jsonl").exists()
        subprocess.run([sys.executable, "-m", "stages.generate"], cwd=ws, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        total = ep.completions_count() - before
    assert uninterrupted <= total <= uninterrupted + concurrency + 1
    assert outputs(ws) == outputs(ref)


def test_plan_before_the_augment_replies_sizes_the_invent_round_as_if_every_fact_had_k_rows():
    """A resume after a crash mid-augment: the invent round's estimate (abstention rows ~ training rows) must not
    shrink to the variants already cached, or the budget check under-counts."""
    p = recipe(augment_variants=K, seen_questions=0, abstain_share=0.5, invented_questions=0, eval_size=0)
    system, fact_templates, units, responses, facts, aug = augment_round(p, 3)
    replies = {**responses, **answered(aug)}
    train, _ = with_variants(facts, aug, replies, p)
    assert len(facts.train) < len(train) <= len(facts.train) * K  # a few new wordings duplicate another fact's

    def invent_requests(cached: dict) -> int:
        rounds = plan(units, lambda keys: {k: cached[k] for k in keys if k in cached}, set(cached), p, 1, system,
                      fact_templates, fake_papers()[:3])
        return next(r.est["requests"] for r in rounds if r.name == "invent")

    # none cached: K rows a fact, at least what the replies give (the estimate errs high, never low)
    assert invent_requests(responses) >= invent_requests(replies) > 1
