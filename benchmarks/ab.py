"""A/B: one benchmark on the working tree and on another commit, round-robin, as a ratio of ratios.

    python benchmarks/ab.py --against HEAD~3                       # the collector, mid size, CPU
    python benchmarks/ab.py --against main --rounds 5 -- --batches 1 4 --repeats 3
    python benchmarks/ab.py --against v0.1 --metric "hooked forward" -- --only "hooked forward"

Each round runs ``benchmarks/gpu.py`` (the working tree's copy, so both sides are measured by the same
code) once per side in a fresh process, alternating which side goes first; only ``hooked_vllm`` is
taken from the side's tree (``PYTHONPATH``; REF is checked out as a git worktree under the system
temp folder, kept for the next run). Each process times ``--metric`` and ``--baseline`` (default:
the three-lens collector and HF's sdpa forward) round-robin itself, so every ratio is measured side
by side in one process, and machine noise between rounds hits both sides alike.

Printed per batch size: each side's ratio (metric / baseline) per round, its best, and the ratio of
the best ratios (working tree / REF): above 1 the working tree is slower than REF. Run it before any
change to the collector, the model's forward or the stores lands (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ARGS = ["--size", "mid", "--device", "cpu", "--batches", "1", "4", "--repeats", "3"]


def worktree(ref: str) -> Path:
    """A checkout of ``ref`` (a git worktree under the temp folder, reused when it is there)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True, text=True
    )
    if sha.returncode != 0:
        sys.exit(f"error: {ref!r} is not a commit of {ROOT} (git rev-parse: {sha.stderr.strip()}).")
    sha = sha.stdout.strip()
    path = Path(tempfile.gettempdir()) / f"hooked-vllm-ab-{sha[:12]}"
    if not (path / "hooked_vllm").is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=ROOT, check=True
        )
    return path


def run_side(tree: Path, bench_args: list[str], out: Path) -> dict:
    """One process of ``gpu.py`` with ``hooked_vllm`` from ``tree``: {"batch N": {name: seconds}}."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *bench_args, "--json", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the benchmark failed on {tree}:\n{done.stderr[-2000:]}")
    result = json.loads(out.read_text())
    imported = Path(result["hooked_vllm"]).resolve()
    if not imported.is_relative_to(tree.resolve()):
        sys.exit(f"error: the run meant for {tree} imported {imported}; check PYTHONPATH handling.")
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", required=True, metavar="REF", help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="processes per side, alternating (3)")
    parser.add_argument("--metric", default="collect (3 lenses)", help="what is timed (gpu.py's name)")
    parser.add_argument("--baseline", default="HF sdpa", help="what it is divided by")
    parser.add_argument(
        "bench_args", nargs="*", help=f"after --: gpu.py's flags (default: {' '.join(DEFAULT_ARGS)})"
    )
    args = parser.parse_args()
    bench_args = args.bench_args or DEFAULT_ARGS
    if "--only" not in bench_args:
        bench_args = [*bench_args, "--only", args.metric]
    sides = {"working tree": ROOT, f"{args.against}": worktree(args.against)}
    ratios: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
            for side in order:
                seconds = run_side(sides[side], bench_args, Path(tmp) / "times.json")
                for group, times in seconds.items():
                    ratio = times[args.metric] / times[args.baseline]
                    ratios[side].setdefault(group, []).append(ratio)
                    print(
                        f"round {round_ + 1} {side:>14s} {group}: {args.metric} "
                        f"{times[args.metric] * 1e3:.1f} ms, {args.baseline} "
                        f"{times[args.baseline] * 1e3:.1f} ms, ratio {ratio:.3f}",
                        flush=True,
                    )
    work, ref = list(sides)
    print(f"\n{args.metric} / {args.baseline}, best of {args.rounds} processes per side:")
    for group in ratios[work]:
        best_work, best_ref = min(ratios[work][group]), min(ratios[ref][group])
        print(
            f"  {group}: working tree {best_work:.3f}x, {ref} {best_ref:.3f}x, "
            f"ratio of ratios {best_work / best_ref:.3f} ({'slower' if best_work > best_ref else 'faster'})"
        )


if __name__ == "__main__":
    main()
