"""The model-card stage's I/O (see `stages.model_card`): the inputs read, the loss curve drawn, the card written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import stages.model_card
from qrb.io import atomic_write_text
from qrb.stage import run_stage

from . import BASE_KEYS, PARAMS_CLASS, SECTION, ModelCardParams
from .inputs import read_inputs
from .render import LOSS_PNG_NAME, render

log = logging.getLogger(__name__)

OUT_DIR = Path("artifacts/model_card")
CARD = OUT_DIR / "README.md"
LOSS_PNG = OUT_DIR / LOSS_PNG_NAME


def loss_png(loss: dict[str, list[tuple[float, float]]], path: Path) -> bool:
    """Plot the loss curve; False when matplotlib is missing or there is nothing to plot."""
    if not any(loss.values()):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in loss.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if name == "eval" else None, markersize=4, label=f"{name} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, metadata={"Software": None})  # no timestamp in the file: same curve, same bytes
    plt.close(fig)
    tmp.replace(path)
    return True


def run(base: dict[str, Any], p: ModelCardParams, args) -> None:
    inputs = read_inputs(base, p)  # every input read and checked before anything is written
    has_png = loss_png(inputs.loss, LOSS_PNG)
    if not has_png:
        LOSS_PNG.unlink(missing_ok=True)
    atomic_write_text(CARD, render(inputs, p, base, has_png))
    what = "a pipeline test: stand-in base" if inputs.base.stand_in else (
        "smoke-endpoint pairs" if inputs.generator.smoke else f"base {inputs.base.name}")
    log.info("model card written to %s (%s; %d papers attributed%s)", CARD, what, len(inputs.papers),
             ", loss curve in " + str(LOSS_PNG) if has_png else "")


def main(argv: list[str] | None = None) -> None:
    run_stage(stages.model_card.__doc__, SECTION, PARAMS_CLASS, BASE_KEYS, run, argv)
