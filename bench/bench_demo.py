"""Benchmark the main job: wall time per stage of the offline demo, and a no-op `dvc repro`.

    python bench/bench_demo.py [--repeats 5]

Runs the demo flow in a fresh temporary workspace (free ports for the mirror and the smoke endpoint), then times
`dvc repro` with nothing to do (goal <= 2 s) against a baseline measured in the same script: `python -m dvc
--version`, i.e. interpreter + DVC start-up, so the ratio shows what the no-op check itself costs. Prints a markdown
table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows.workspace import profile_params, venv_env  # noqa: E402
from standins.services import free_ports, port_overrides  # noqa: E402


def timed(cmd: list[str], cwd: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=venv_env(), check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from flows.demo import demo

    with tempfile.TemporaryDirectory(prefix="qrb-bench-") as tmp:
        ws = Path(tmp) / "demo"
        overrides = port_overrides(profile_params("tiny"), *free_ports(2))
        t0 = time.perf_counter()
        run = demo(str(ws), "tiny", overrides)
        total = time.perf_counter() - t0
        noop = timed([sys.executable, "-m", "dvc", "repro"], ws, args.repeats)
        baseline = timed([sys.executable, "-m", "dvc", "--version"], ws, args.repeats)

    stages_total = sum(r["wall_s"] for r in run["stages"])
    print("| stage | wall s | share of stage time |\n|---|---|---|")
    for r in run["stages"]:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | {r['wall_s'] / stages_total:.0%} |")
    print(f"| all stages | {stages_total:.1f} | 100% |")
    print(f"| demo flow total (workspace, tiny model, services, Prefect) | {total:.1f} | "
          f"{total / stages_total:.2f}x stage time |")
    print()
    print("| command (median of %d) | s | ratio to baseline |\n|---|---|---|" % args.repeats)
    print(f"| `python -m dvc --version` (baseline: start-up) | {baseline:.2f} | 1.00 |")
    print(f"| `dvc repro`, nothing changed | {noop:.2f} | {noop / baseline:.2f} |")


if __name__ == "__main__":
    main()
