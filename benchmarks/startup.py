"""What a user waits for before any model runs: `import hooked_vllm`, `hooked-vllm --help`, a mistyped
flag, and the error for a hub id that is neither cached nor reachable (the library and the CLI).

    python benchmarks/startup.py [--against REF_TREE] [--repeats 3]

Each command runs in a fresh process (as a user meets it), with PYTHONPATH pointing at this tree or at
``--against`` (e.g. a git worktree of an earlier commit), alternating between the trees; best of
``--repeats`` wall-clock seconds. The offline error is run once per tree (before the fix it took half a
minute).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
HUB_ID = "llava-hf/llava-1.5-7b-hf"
LIBRARY_ERROR = (
    "import time\n"
    "from hooked_vllm import HookedVLM\n"
    "started = time.perf_counter()\n"
    "try:\n"
    f"    HookedVLM.from_pretrained({HUB_ID!r})\n"
    "except Exception as error:\n"
    "    print(f'{time.perf_counter() - started:.2f}', type(error).__name__, len(str(error).splitlines()))\n"
)


def commands() -> dict[str, list[str]]:
    python = sys.executable
    return {
        "import hooked_vllm": [python, "-c", "import hooked_vllm"],
        "hooked-vllm --help": [python, "-m", "hooked_vllm.cli", "--help"],
        "mistyped flag": [python, "-m", "hooked_vllm.cli", "phase-diagram", "--bogus"],
    }


def timed(command: list[str], tree: Path, cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, default=None, help="another tree to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    trees = {"this tree": HERE, **({f"{args.against}": args.against.resolve()} if args.against else {})}
    with tempfile.TemporaryDirectory() as scratch:
        cwd = Path(scratch)
        best: dict[tuple[str, str], float] = {}
        for _ in range(args.repeats):
            for label, command in commands().items():
                for tree_name, tree in trees.items():
                    seconds, _ = timed(command, tree, cwd)
                    key = (label, tree_name)
                    best[key] = min(best.get(key, float("inf")), seconds)
        for tree_name, tree in trees.items():
            seconds, done = timed([sys.executable, "-c", LIBRARY_ERROR], tree, cwd)
            inside = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-200:]
            best[("from_pretrained(uncached hub id), process", tree_name)] = seconds
            print(f"# {tree_name}: from_pretrained -> {inside} (seconds inside, error, lines)")
            command = [sys.executable, "-m", "hooked_vllm.cli", "phase-diagram", "--model", HUB_ID]
            seconds, done = timed([*command, "--out", str(cwd / "out")], tree, cwd)
            best[("CLI --model uncached hub id", tree_name)] = seconds
            print(f"# {tree_name}: CLI exit {done.returncode}, stderr lines {len(done.stderr.splitlines())}")
    names = list(trees)
    print(f"| what (s, best of {args.repeats}) | {' | '.join(names)} |")
    print("|---|" + "---|" * len(names))
    for label in dict.fromkeys(key[0] for key in best):
        print(f"| {label} | " + " | ".join(f"{best[(label, n)]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
