"""Where the main job's time goes: `hooked-vllm phase-diagram` with no arguments, stage by stage.

    python benchmarks/main_job.py [--rounds 3] [--against REF] [-- extra phase-diagram flags]

Runs the main job (the README's first command: the embedded default model and data) in a fresh
process per round, into a new temporary --out, and times its stages by wrapping the functions the
CLI calls (the same names on the working tree and on REF, so ``--against`` compares the two, in
alternating processes):

- start: the interpreter's own start (process age when our first line runs);
- import: ``hooked_vllm.cli``; import libraries: torch, transformers, transformer-lens and the rest,
  which the CLI imports when it needs them (imported up front here, to be timed);
- load model, load data (the dataset sample: for the default, the shapes images drawn);
- forward: the collector over every batch (``analysis.collect``); store: result parts written and
  read back; aggregate: the aggregates and phases (with ``aggregates.json``/``.csv``);
- explorer: the report's explored items (their forward passes, saliency, lenses, answers);
- report: ``report.html`` and the PNGs; other: the rest (argument checks, printing);
- exit: interpreter shutdown; total: from the process start to its exit, measured outside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "start",
    "import",
    "import libraries",
    "load model",
    "load data",
    "forward",
    "store",
    "aggregate",
    "explorer",
    "report",
    "other",
    "exit",
)

# Runs inside the measured process: wraps the stages' functions, runs the CLI, prints the times.
CHILD = r"""
import json, sys, time
from pathlib import Path

def process_age():
    ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - ticks / __import__("os").sysconf("SC_CLK_TCK")

t0 = time.perf_counter()
times = {"start": process_age()}
import hooked_vllm.cli as cli
import hooked_vllm.cli.phase_diagram as job
times["import"] = time.perf_counter() - t0

def timed(module, name, stage):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[stage] = times.get(stage, 0.0) + time.perf_counter() - start
    setattr(module, name, wrapper)
    return original

t1 = time.perf_counter()
import hooked_vllm.report.html as report_html
import hooked_vllm.runs.phase_diagram as pd
import hooked_vllm.runs.store as store
times["import libraries"] = time.perf_counter() - t1  # torch, transformers, transformer-lens...
timed(job, "load_model", "load model")
timed(job, "load_data", "load data")
timed(job, "_explore", "explorer")
timed(report_html, "write_report", "report")
timed(pd, "collect", "forward")
timed(pd, "aggregate", "aggregate")
timed(pd, "write_aggregates", "aggregate")
timed(store.ResultStore, "write", "store")
timed(store.ResultStore, "read", "store")
start = time.perf_counter()
code = cli.main(["phase-diagram", "--no-progress", *sys.argv[1:]])
times["main"] = time.perf_counter() - start
times["until exit"] = time.perf_counter() - t0
print("TIMES " + json.dumps({"code": code, "times": times}))
"""


def one_run(tree: Path, flags: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", CHILD, "--out", out, *flags],
            env=env,
            capture_output=True,
            text=True,
            cwd=out,
        )
        total = time.perf_counter() - start
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("TIMES ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"error: the main job failed on {tree} (exit {done.returncode}):\n{done.stderr[-2000:]}")
    times = json.loads(line[len("TIMES ") :])["times"]
    main = times.pop("main")
    named = sum(times.get(stage, 0.0) for stage in STAGES[3:10])  # load model .. report
    times["other"] = max(0.0, main - named)
    times["exit"] = max(0.0, total - times["start"] - times.pop("until exit"))
    times["total"] = total
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", default=None, metavar="REF", help="also time REF (a git worktree)")
    parser.add_argument("flags", nargs="*", help="after --: extra phase-diagram flags")
    args = parser.parse_args()
    sides = {"working tree": ROOT}
    if args.against:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from ab import worktree

        sides[args.against] = worktree(args.against)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for round_ in range(args.rounds):
        for side in list(sides) if round_ % 2 == 0 else list(reversed(sides)):
            times = one_run(sides[side], args.flags)
            runs[side].append(times)
            print(f"round {round_ + 1} {side}: total {times['total']:.2f} s", flush=True)
    print(f"\nmedian of {args.rounds} runs, seconds:")
    print(f"{'stage':12s}" + "".join(f"{side:>16s}" for side in sides))
    for stage in (*STAGES, "total"):
        cells = []
        for side in sides:
            values = sorted(r.get(stage, 0.0) for r in runs[side])
            cells.append(f"{values[len(values) // 2]:16.2f}")
        print(f"{stage:12s}" + "".join(cells))


if __name__ == "__main__":
    main()
