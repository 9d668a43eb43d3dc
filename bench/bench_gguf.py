"""How much the GGUF export moves the model: token-weighted CE of the merged model and of its Q8_0 and F16 GGUFs as
transformers' GGUF loader reads them back (the export stage's own check), with sizes and times, in ONE run.

    .venv/bin/python bench/bench_gguf.py --merged DIR --rows FILE.jsonl [--limit N] [--adapter DIR] [--out FILE]

`--merged` is a merged model folder (artifacts/export/merged), or a base model folder to measure the base itself;
with `--adapter` the adapter is first merged into `--merged` by the export stage's core (fp32). The CE is
`qrb.model.token_weighted_ce` over the answer tokens of the first `--limit` rows, with the model's system prompt from
params.yaml, each GGUF scored with its own tokenizer and chat template.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--merged", required=True, type=Path)
    ap.add_argument("--rows", required=True, type=Path)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--params", default=str(REPO / "profiles" / "smol.yaml"), help="system_prompt, max_length")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from qrb.stage import set_cpu_threads

    set_cpu_threads()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrb.gguf_export import load_gguf, write_gguf
    from qrb.io import read_jsonl
    from qrb.model import token_weighted_ce
    from qrb.params import read_yaml

    base = read_yaml(args.params).get("base") or {}
    system, max_length = base["system_prompt"], base.get("max_length", 512)
    rows = list(read_jsonl(args.rows))[:args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    merged = args.merged
    if args.adapter:
        from qrb.params import build
        from stages import export as ex

        p = build(ex.ExportParams, {"merge_precision": "fp32", "gguf": "none", "eval_batch_size": 8,
                                    "hub_repo_id": None, "hub_token_env": "HF_TOKEN", "hub_private": True}, "export")
        (tmp / "card").mkdir()
        ex.export({"model": str(args.merged), "system_prompt": system, "max_length": max_length}, p, [], "cpu",
                  adapter_dir=args.adapter, card_dir=tmp / "card", out=tmp / "export")
        merged = tmp / "export" / "merged"

    def ce(model, tok) -> float:
        return token_weighted_ce(model, tok, rows, system, batch_size=8, max_length=max_length)["cross_entropy"]

    t = time.perf_counter()
    ref = ce(AutoModelForCausalLM.from_pretrained(merged).eval(), AutoTokenizer.from_pretrained(merged))
    results = [{"form": "merged", "bytes": sum(f.stat().st_size for f in merged.glob("*.safetensors")),
                "ce": ref, "delta": 0.0, "write_s": None, "score_s": time.perf_counter() - t}]
    for kind in ("q8_0", "f16"):
        f = tmp / f"m-{kind}.gguf"
        t = time.perf_counter()
        write_gguf(merged, f, kind)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        x = ce(*load_gguf(f, merged))
        results.append({"form": kind, "bytes": f.stat().st_size, "ce": x, "delta": x - ref, "write_s": t_write,
                        "score_s": time.perf_counter() - t})
        f.unlink()
    print(f"{len(rows)} rows; merged = {merged}")
    print(f"{'form':8} {'MB':>8} {'CE':>9} {'delta':>10} {'write s':>8} {'load+score s':>13}")
    for r in results:
        print(f"{r['form']:8} {r['bytes'] / 1e6:8.1f} {r['ce']:9.4f} {r['delta']:+10.5f} "
              f"{r['write_s'] if r['write_s'] is None else round(r['write_s'], 1)!s:>8} {r['score_s']:13.1f}")
    if args.out:
        args.out.write_text(json.dumps({"rows": len(rows), "merged": str(merged), "results": results}, indent=2))


if __name__ == "__main__":
    main()
