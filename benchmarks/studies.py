"""Each study's time over the plain forward passes it needs (BENCHMARKS.md, "Studies").

    python benchmarks/studies.py [--num-items 64] [--batch-size 8] [--studies knockout pruning ...]

On the demo model and the shapes task: the study's per-item function over every batch (as
``run_study`` times it), against the same number of plain ``vlm(batch)`` forwards on the same
batches (knockout: one clean forward plus one per edge type and window; pruning: one clean plus one
per K, R and criterion; object-ablation: one clean plus two ablated), round-robin, best of
``--repeats``. Also the study's plan over the sample (object-ablation's mean image token: the vision
side only), the whole ``run_study`` call (plan, store, aggregation) and the report.
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
from hooked_vllm.studies import KnockoutStudy, ObjectAblationStudy, PruningStudy, run_study
from hooked_vllm.studies.knockout import knockout_windows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
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
    for name in args.studies:
        study, n_forwards, what = STUDIES[name](vlm)
        measure(name, study, n_forwards, what, vlm, batches, sample, folder, args)


def knockout_setup(vlm):
    study = KnockoutStudy()
    windows = knockout_windows(vlm.cfg.n_layers, study.params.window)
    return study, 1 + len(study.params.edges) * len(windows), "1 clean + edges x windows"


def pruning_setup(vlm):
    study = PruningStudy()
    n = len(study.settings_grid()) * len(study.criteria())
    return study, 1 + n, "1 clean (the selection's attention read on the way) + K x R x criteria"


def object_ablation_setup(vlm):
    study = ObjectAblationStudy()
    return study, 3, "1 clean (the logit lens read on the way) + object-ablated + random-ablated"


STUDIES = {"knockout": knockout_setup, "pruning": pruning_setup, "object-ablation": object_ablation_setup}


def measure(name, study, n_forwards, what, vlm, batches, sample, folder, args) -> None:
    """The study's per-item function over every batch against ``n_forwards`` plain forwards a batch."""
    began = time.perf_counter()
    study.plan(vlm, sample)  # a study's pass over the whole sample first (object-ablation's mean)
    planned = time.perf_counter() - began

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
    result = run_study(study, vlm, sample, folder / name, batch_size=args.batch_size, progress=False)
    whole = time.perf_counter() - began
    began = time.perf_counter()
    study.write_report(folder / name, result.aggregates, "benchmark")
    report = time.perf_counter() - began
    print(f"{name}, demo model ({vlm.cfg.n_layers} blocks), {args.num_items} items, batch {args.batch_size}:")
    print(f"  forwards needed per batch: {n_forwards} ({what})")
    print(f"  plain forwards: {best['plain']:.3f} s; the study's per-item function: {best['study']:.3f} s")
    print(f"  study / plain forwards: {best['study'] / best['plain']:.3f}x (best of {args.repeats})")
    print(f"  the study's plan over the sample: {planned:.3f} s")
    print(f"  whole run_study (plan, store, aggregation): {whole:.3f} s; report: {report:.3f} s")


if __name__ == "__main__":
    main()
