"""Which training data makes SmolLM2 know the papers and say when it doesn't: one script, the same papers and the
same seen + held-out + invented question sets for every arm, graded correct / incorrect / not attempted.

    .venv/bin/python bench/bench_knowledge.py                  # every arm (~1 h on 2 quiet cores)
    .venv/bin/python bench/bench_knowledge.py --arms qa_k8 qa_k8_abstain --epochs 3

Arms (each trains the stage's own trainer, `stages.train.trainer.train`, on the smol profile's recipe, from the
same base model and seed):
  qa_k1 / qa_k5 / qa_k8      each training fact as its question only / in 5 / in 8 wordings (one a reverse question)
  text                       the training papers' text and its rule-based rewrites alone (`train.text`)
  text_qa                    text + QA at K=5, mixed
  <arm>_abstain              the same + abstention rows (questions about invented papers -> ABSTAIN_ANSWER) at the
                             smol profile's generate.abstain_share
The data comes from the smoke endpoint's fact writer (pure functions, as the demo's generate gets it): one fact per
paper (`--facts`), the generate stage's split of papers (held-out papers never trained, their text included), the
seen set (a new wording per training fact) and the invented set (papers that do not exist) fixed for every arm.
Writes bench/results/knowledge.json (every arm: rates with 95% bootstrap intervals, paired gain over base, training
tokens and seconds) and prints a table; BENCHMARKS.md holds the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("qa_k1", "qa_k5", "qa_k8", "text", "text_qa")


def build_sets(papers: list[dict], facts_per_paper: int, held_out: int, seed: int, n_invented: int):
    """(training facts with their wordings, seen, held-out, invented, training papers)."""
    from standins.smoke.facts import extract_facts, fact_wordings, invented_questions, new_wording

    order = sorted(papers, key=lambda r: r["doi"])
    random.Random(seed).shuffle(order)
    held = {r["doi"] for r in order[:held_out]}
    train, seen, heldq = [], [], []
    for r in papers:
        for f in extract_facts(r["title"], r["abstract"], facts_per_paper):
            f = {**f, "title": r["title"], "doi": r["doi"]}
            if r["doi"] in held:
                heldq.append({"question": f["question"], "short_answer": f["short_answer"], "aliases": f["aliases"]})
                continue
            train.append({**f, "wordings": fact_wordings(f, 7)})
            seen.append({"question": new_wording(f), "short_answer": f["short_answer"], "aliases": f["aliases"]})
    titles = [r["title"] for r in papers]
    train_papers = [r for r in papers if r["doi"] not in held]
    invented = [{"question": q["question"], "short_answer": "", "aliases": [], "title": q["title"]}
                for q in invented_questions(f"bench-eval:{seed}", n_invented, set(), titles, openings(train_papers))]
    return train, seen, heldq, invented, train_papers


def openings(papers: list[dict]) -> list[str]:
    """What generate's invent requests list of the training papers (their abstracts' opening sentences)."""
    from stages.generate.facts import _opening

    return [_opening(r["abstract"]) for r in papers]


def qa_rows(train: list[dict], k: int) -> list[dict]:
    rows = []
    for f in train:
        rows.append({"question": f["question"], "answer": f["answer"], "doi": f["doi"]})
        extra = f["wordings"][:k - 1] if k < 8 else f["wordings"]
        if 1 < k < 8 and f["wordings"] and f["wordings"][-1].get("kind") == "reverse":
            extra = f["wordings"][:k - 2] + [f["wordings"][-1]]  # the reverse question is always one of them
        rows += [{"question": w["question"], "answer": w["answer"], "doi": f["doi"]} for w in extra]
    return rows


def abstain_rows(n: int, seed: int, titles: list[str], avoid: set[str], train_papers: list[dict]) -> list[dict]:
    from qrb.schema import ABSTAIN_ANSWER
    from standins.smoke.facts import invented_questions

    found = invented_questions(f"bench-train:{seed}", n + 20, {t.lower() for t in avoid}, titles,
                               openings(train_papers))
    return [{"question": q["question"], "answer": ABSTAIN_ANSWER, "doi": ""} for q in found[:n]]


def rate(values: list[float], seed: int, samples: int = 1000) -> tuple[float, list[float]]:
    import numpy as np

    v = np.array(values, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(samples, len(v)))
    means = v[idx].mean(axis=1)
    return float(v.mean()), [round(float(np.percentile(means, 2.5)), 3), round(float(np.percentile(means, 97.5)), 3)]


def score(model, tok, sets: dict[str, list[dict]], system: str, seed: int, max_new: int, bf16: bool) -> dict:
    import torch

    from qrb.grade import grade
    from qrb.model import generate_answers

    out = {}
    for name, qs in sets.items():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # bf16_cpu loads the base in bf16
            answers = generate_answers(model, tok, [q["question"] for q in qs], system, batch_size=16,
                                       max_new_tokens=max_new, greedy=True)
        grades = [grade(a, q["short_answer"], q["aliases"], q["question"]) for a, q in zip(answers, qs)]
        out[name] = {"grades": grades, "answers": answers}
    return out


def summarise(graded: dict, base: dict | None, seed: int) -> dict:
    out = {}
    for name, g in graded.items():
        grades = g["grades"]
        row = {"n": len(grades)}
        for key in ("correct", "incorrect", "not_attempted"):
            row[key], row[f"{key}_ci95"] = rate([x == key for x in grades], seed)
        attempted = [x == "incorrect" for x in grades if x != "not_attempted"]
        row["hallucination_rate"] = round(sum(attempted) / len(attempted), 3) if attempted else None
        if base is not None:
            diff = [(x == "correct") - (y == "correct") for x, y in zip(grades, base[name]["grades"])]
            row["correct_gain"], row["correct_gain_ci95"] = rate(diff, seed)
        out[name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="*", default=[a + s for a in ARMS for s in ("", "_abstain")])
    ap.add_argument("--facts", type=int, default=1, help="facts per paper")
    ap.add_argument("--held-out", type=int, default=8, help="held-out papers")
    ap.add_argument("--invented", type=int, default=30)
    ap.add_argument("--epochs", type=float, default=None, help="default: the smol profile's")
    ap.add_argument("--out", default=str(ROOT / "bench/results/knowledge.json"))
    args = ap.parse_args()

    from qrb.stage import set_cpu_threads

    set_cpu_threads()
    from datasets import Dataset, DatasetDict

    from qrb.params import build, deep_merge, read_yaml
    from stages.train import TrainParams
    from stages.train.trainer import train

    params = deep_merge(read_yaml(ROOT / "params.yaml"), read_yaml(ROOT / "profiles/smol.yaml"))
    base = params["base"]
    base["model"] = os.environ.get("QRB_SMOL_MODEL", str(ROOT / base["model"]))
    seed = base["seed"]
    papers = [json.loads(line) for f in ("quantum-papers.jsonl", "quantum-papers-arxiv.jsonl")
              for line in (ROOT / "data/corpus" / f).read_text().splitlines() if line.strip()]
    papers = [r for r in papers if r.get("abstract") and r.get("doi")
              and params["scrape"]["date_from"] <= (r.get("published") or "") <= params["scrape"]["date_to"]]
    train_facts, seen, heldq, invented, train_papers = build_sets(papers, args.facts, args.held_out, seed,
                                                                  args.invented)
    sets = {"seen": seen, "held_out": heldq, "invented": invented}
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    results["setup"] = {"papers": len(papers), "train_facts": len(train_facts), **{k: len(v) for k, v in sets.items()},
                        "epochs": args.epochs, "facts_per_paper": args.facts}
    share = params["generate"]["abstain_share"]
    max_new = params["evaluate"]["max_new_tokens"]
    for arm in args.arms:
        kind, abstain = arm.removesuffix("_abstain"), arm.endswith("_abstain")
        k = {"qa_k1": 1, "qa_k5": 5, "qa_k8": 8, "text_qa": 5}.get(kind, 0)
        # text alone: one empty row per training paper names the papers whose text it reads
        rows = qa_rows(train_facts, k) if k else [{"question": "", "answer": "", "doi": r["doi"]} for r in train_papers]
        tp = {**params["train"], "checkpoint_steps": 0, "emissions_country": None, "report_to": "none"}
        if args.epochs:
            tp["epochs"] = args.epochs
        if kind.startswith("text"):  # text + QA: as many text rows as QA rows; text alone: each version once an epoch
            n_text = len(train_papers) * (tp["text"]["rewrites"] + 1)
            qa_like = len(rows) + (round(share * max(len(rows), len(train_facts) * 5)) if abstain else 0)
            tp["text"] = {**tp["text"], "share": 0.5 if k else round(n_text / (n_text + qa_like), 4)}
        if abstain:
            rows += abstain_rows(round(share * max(len(rows), len(train_facts) * 5)), seed,
                                 [r["title"] for r in papers], {q["title"] for q in invented}, train_papers)
        p = build(TrainParams, tp, "train")
        dd = {"train": Dataset.from_list(rows),
              "eval": Dataset.from_list([])}
        if kind.startswith("text"):
            dd["papers"] = train_papers
        t0 = time.time()
        model, tok, metrics, _ = train(base, p, DatasetDict(dd) if "papers" not in dd else dd, "cpu")
        wall = time.time() - t0
        bf16 = p.precision == "bf16_cpu"
        graded = score(model, tok, sets, base["system_prompt"], seed, max_new, bf16)
        if "base" not in results:
            with model.disable_adapter():
                base_scored = score(model, tok, sets, base["system_prompt"], seed, max_new, bf16)
            results["base"] = summarise(base_scored, None, seed)
            results["base_grades"] = {n: g["grades"] for n, g in base_scored.items()}
        base_graded = {n: {"grades": g} for n, g in results["base_grades"].items()}
        results[arm] = {**summarise(graded, base_graded, seed), "train_tokens": metrics["tokens_seen"],
                        "train_s": round(wall, 1), "steps": metrics["steps"], "rows": len(rows),
                        "examples": {n: list(zip([q["question"] for q in sets[n]][:3], g["answers"][:3]))
                                     for n, g in graded.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        s = results[arm]
        print(f"{arm:<18} seen correct {s['seen']['correct']:.2f} {s['seen']['correct_ci95']}  "
              f"held-out not attempted {s['held_out']['not_attempted']:.2f}  invented not attempted "
              f"{s['invented']['not_attempted']:.2f}  {s['train_tokens']} tokens {s['train_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
