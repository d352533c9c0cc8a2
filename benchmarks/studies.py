"""Each study's time over the plain forward passes it needs (BENCHMARKS.md, "Studies").

    python benchmarks/studies.py [--num-items 64] [--batch-size 8]

On the demo model and the shapes task: the study's per-item function over every batch (as
``run_study`` times it), against the same number of plain ``vlm(batch)`` forwards on the same
batches (knockout: one clean forward plus one per edge type and window), round-robin, best of
``--repeats``. Also the whole ``run_study`` call (store, aggregation) and the report.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hooked_vllm import HookedVLM
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.shapes_dataset import load_shapes
from hooked_vllm.studies import KnockoutStudy, run_study
from hooked_vllm.studies.knockout import knockout_windows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    vlm = HookedVLM.from_pretrained("demo")
    folder = Path(tempfile.mkdtemp())
    sample = load_shapes(folder / "shapes", n=args.num_items)
    batches = []
    for start in range(0, len(sample.items), args.batch_size):
        items = sample.items[start : start + args.batch_size]
        batch = vlm.prepare([load_image(i.image_path) for i in items], [i.instruction for i in items])
        batches.append((items, batch))
    study = KnockoutStudy()
    n_forwards = 1 + len(study.params.edges) * len(knockout_windows(vlm.cfg.n_layers, study.params.window))

    def plain() -> float:
        began = time.perf_counter()
        for _, batch in batches:
            for _ in range(n_forwards):
                vlm(batch)
        return time.perf_counter() - began

    def studied() -> float:
        began = time.perf_counter()
        for items, batch in batches:
            study.item_rows(vlm, items, batch)
        return time.perf_counter() - began

    plain(), studied()  # warm-up
    times = {"plain": [], "study": []}
    for _ in range(args.repeats):
        times["plain"].append(plain())
        times["study"].append(studied())
    best = {key: min(values) for key, values in times.items()}
    began = time.perf_counter()
    result = run_study(study, vlm, sample, folder / "run", batch_size=args.batch_size, progress=False)
    whole = time.perf_counter() - began
    began = time.perf_counter()
    study.write_report(folder / "run", result.aggregates, "benchmark")
    report = time.perf_counter() - began
    print(
        f"knockout, demo model ({vlm.cfg.n_layers} blocks), {args.num_items} items, batch {args.batch_size}:"
    )
    print(f"  forwards needed per batch: {n_forwards} (1 clean + edges x windows)")
    print(f"  plain forwards: {best['plain']:.3f} s; the study's per-item function: {best['study']:.3f} s")
    print(f"  study / plain forwards: {best['study'] / best['plain']:.3f}x (best of {args.repeats})")
    print(f"  whole run_study (store, aggregation): {whole:.3f} s; report: {report:.3f} s")


if __name__ == "__main__":
    main()
