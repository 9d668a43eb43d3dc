"""The sweep's table: best eval cross-entropy per technique, with the config's extra columns (`report`) and a
published figure beside each technique (`card`), read from each experiment's metrics files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.sweep import SweepConfig

TECHNIQUE_KEY = "train.method"


def fmt_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def read_report(workspace: Path, report: list[dict[str, str]]) -> dict[str, float | None]:
    """The config's extra columns for one finished run (None where a file or key is missing)."""
    out: dict[str, float | None] = {}
    for col in report:
        try:
            out[col["name"]] = float(dotted(json.loads((workspace / col["file"]).read_text()), col["key"]))
        except (OSError, KeyError, TypeError, ValueError):
            out[col["name"]] = None
    return out


def _scored(run: dict[str, Any]) -> bool:
    return run.get("metric") is not None and math.isfinite(run["metric"])


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The lowest finite metric; runs without one (failed, or no eval set: null) are never the best."""
    return min((r for r in runs if _scored(r)), key=lambda r: r["metric"], default=None)


def best_per_technique(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["params"].get(TECHNIQUE_KEY) == method]
        failed = sum(not _scored(r) and (r.get("metric") is not None or bool(r.get("error"))) for r in mine)
        rows.append({"technique": method, "best": best_run(mine), "runs": len(mine), "failed": failed})
    return sorted(rows, key=lambda row: (row["best"] is None, row["best"]["metric"] if row["best"] else 0))


def table_markdown(rows: list[dict[str, Any]], cfg: SweepConfig) -> str:
    keys = [k for k in [*cfg.grid, *cfg.space] if k != TECHNIQUE_KEY]
    keys = list(dict.fromkeys(keys))
    extra = [col["name"] for col in cfg.report]
    card = ["card"] if cfg.card else []
    head = ["technique", f"best eval cross-entropy ({cfg.metric_key})", *card, *extra, *keys, "experiment", "runs"]
    lines = ["Best eval cross-entropy per technique (lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        best = row["best"]
        cells = [row["technique"]]
        if best:
            got = best.get("report") or {}
            cells += [f"{best['metric']:.4f}", *_card(cfg, row["technique"]),
                      *("–" if got.get(x) is None else f"{got[x]:.3f}" for x in extra),
                      *(fmt_value(best["params"].get(k, "")) for k in keys), best["name"]]
        else:
            what = "no eval set" if row["runs"] > row["failed"] else "failed"  # ran, but with no metric: null
            cells += [what, *_card(cfg, row["technique"]), *([""] * (len(extra) + len(keys))), ""]
        cells.append(f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _card(cfg: SweepConfig, technique: str) -> list[str]:
    if not cfg.card:
        return []
    return [f"{cfg.card[technique]:.4f}" if technique in cfg.card else "–"]
