"""Knowledge augmentation on the real model: does fine-tuning teach the papers' facts, with K wordings vs one?

    .venv/bin/python bench/bench_augmentation.py [--root /tmp/qrb-aug] [--arms k5 k1 k1-steps] [--out F.json]

Each arm is a scratch workspace of the smol profile (SmolLM2-135M-Instruct, the journal mirror and the smoke
endpoint on free ports), the same papers and the same facts (one per paper), run through `dvc repro` up to train; only
`generate.augment_variants` (K) and `train.epochs` differ:
  k5        K=5, 3 epochs (the FIELD-NOTES probe's setting: 5 wordings of each fact)
  k1        K=1, 3 epochs: epochs held equal (a fifth of k5's optimizer steps)
  k1-steps  K=1, 15 epochs: steps held equal to k5 (is it just more steps on the same facts?)
Every arm is then scored by the evaluate stage on ONE question set: the "seen papers, new questions" set of the K=5
arm (its reworded questions were checked against every training question of the most augmented arm, so they are
unseen wordings for all arms). Reported per arm: steps and train seconds; for base, fine-tuned, RAG and
fine-tuned + RAG, fact recall and facts stated with 95% bootstrap intervals, and fine-tuned's paired gains over base;
eval CE of base and fine-tuned. Prints a Markdown table (BENCHMARKS.md) and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ARMS = {  # name -> the params it overrides in the smol profile
    "k5": {"generate.augment_variants": 5, "train.epochs": 3.0},
    "k1": {"generate.augment_variants": 1, "train.epochs": 3.0},
    "k1-steps": {"generate.augment_variants": 1, "train.epochs": 15.0},
}
REFERENCE_ARM = "k5"  # whose seen set every arm is scored on
MODELS = ("base", "fine_tuned", "rag", "fine_tuned_rag")


def sh(cmd: list[str], cwd: Path, env: dict, log) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}); see {log.name}")


def arm_overrides(name: str, profile: dict, ports: tuple[int, int]) -> dict:
    from qrb.offline.services import port_overrides
    from qrb.params import nested

    out = nested(dict(ARMS[name]))
    for section, values in port_overrides(profile, *ports).items():
        out.setdefault(section, {}).update(values)
    return out


def prepare(root: Path, name: str, log) -> Path:
    from flows import workspace as wsp
    from qrb.offline import smol_model
    from qrb.offline.services import free_ports

    profile = wsp.profile_params("smol", REPO)
    ws = wsp.prepare(root / name, "smol", overrides=arm_overrides(name, profile, tuple(free_ports(2))))
    model = profile["base"]["model"]
    if not (ws / model / "config.json").exists():
        cache = Path.home() / ".cache" / "qrb-tests" / "smollm2-135m-instruct"
        src = smol_model.build(cache)
        shutil.copytree(src, ws / model)  # a copy of the one conversion (hardlinks would make DVC's cache read-only)
        sh(wsp.dvc("add", "-q", model), ws, wsp.venv_env(), log)
    return ws


def run_arm(ws: Path, target: str, log) -> float:
    from flows.workspace import dvc, venv_env
    from qrb.offline.services import stand_ins

    t0 = time.time()
    with stand_ins(ws):
        sh(dvc("repro", target), ws, venv_env(), log)
    return time.time() - t0


def score(ws: Path, seen: Path, log) -> dict:
    """The evaluate stage on the reference arm's seen set (the file evaluate reads, replaced in this scratch copy)."""
    from flows.workspace import venv_env

    target = ws / "artifacts" / "validate" / "seen.jsonl"
    target.unlink(missing_ok=True)  # DVC's cache link: replace it, never write through it
    shutil.copy2(seen, target)
    sh([sys.executable, "-m", "stages.evaluate"], ws, venv_env(), log)
    metrics = json.loads((ws / "reports" / "evaluate.json").read_text())
    train = json.loads((ws / "reports" / "train.json").read_text())
    pairs = json.loads((ws / "metrics" / "generate.json").read_text()).get("train_pairs")
    return {"steps": train.get("steps"), "train_wall_s": train.get("wall_s"), "train_pairs": pairs,
            "seen": {m: metrics["seen"].get(m, {}) for m in MODELS}}


def cell(m: dict, key: str, fmt: str = ".3f") -> str:
    if key not in m:
        return "–"
    ci = m.get(f"{key}_ci95")
    inner = f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if isinstance(ci, list) else ""
    return f"{m[key]:{fmt}}{inner}"


def table(results: dict) -> str:
    lines = ["| arm | steps | model | fact recall | facts stated | gain vs base: fact recall | gain: facts stated | "
             "eval CE | words |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for model in MODELS:
            m = r["seen"][model]
            lines.append(f"| {name} | {r['steps']} | {model} | {cell(m, 'fact_recall')} | {cell(m, 'facts_stated')} | "
                         f"{cell(m, 'fact_recall_gain', '+.3f')} | {cell(m, 'facts_stated_gain', '+.3f')} | "
                         f"{cell(m, 'cross_entropy')} | {m.get('answer_words', 0):.1f} |")
    n = next(iter(results.values()))["seen"]["base"].get("n")
    return "\n".join(lines) + f"\n\nSeen-papers set of the {REFERENCE_ARM} arm, n={n} questions.\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/qrb-aug", help="where the arms' workspaces go")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default=None, help="JSON results (default <root>/results.json)")
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    arms = [REFERENCE_ARM] + [a for a in args.arms if a != REFERENCE_ARM]
    results: dict = {}
    out = Path(args.out) if args.out else root / "results.json"
    with open(root / "bench.log", "a") as log:
        seen = None
        for name in arms:
            ws = prepare(root, name, log)
            wall = run_arm(ws, "train", log)
            if name == REFERENCE_ARM:
                seen = ws / "artifacts" / "validate" / "seen.jsonl"
                seen = shutil.copy2(seen, root / "seen.jsonl")
            results[name] = score(ws, Path(seen), log)
            results[name]["pipeline_wall_s"] = round(wall, 1)
            print(f"{name}: {results[name]['steps']} steps, {results[name]['train_wall_s']} s training", flush=True)
            ordered = {a: results[a] for a in args.arms if a in results}
            out.write_text(json.dumps(ordered, indent=2) + "\n")  # after every arm: a long run keeps what it has
    print(table(ordered))


if __name__ == "__main__":
    main()
