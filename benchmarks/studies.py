"""Each study's time over the plain forward passes it needs (BENCHMARKS.md, "Studies").

    python benchmarks/studies.py [--num-items 64] [--batch-size 8] [--studies knockout pruning ...]

On the demo model and the shapes task: the study's per-item function over every batch (as
``run_study`` times it), against the same number of plain ``vlm(batch)`` forwards on the same
batches (knockout: one clean forward plus one per edge type and window; pruning: one clean plus one
per K, R and criterion; object-ablation: one clean plus two ablated; attribution: one clean, one
corrupted forward (its backward counted in the study's time, not as a forward), and per hook kind
one per (block, position group) and per drawn cell), round-robin, best of ``--repeats``. For
attribution also the estimate alone (clean forward, corrupted forward and backward) against two plain
forwards. Also the study's plan over the sample (object-ablation's mean image token: the vision
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
from hooked_vllm.studies import AttributionStudy, KnockoutStudy, ObjectAblationStudy, PruningStudy, run_study
from hooked_vllm.studies.attribution import clean_run, gradient_run, hook_names
from hooked_vllm.studies.attribution_study import LogitDifference, position_groups
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
        setup = STUDIES[name]
        study, n_forwards, what = setup(vlm, batches[0][1]) if name == "attribution" else setup(vlm)
        measure(name, study, n_forwards, what, vlm, batches, sample, folder, args)
        if name == "attribution":
            measure_estimate(vlm, batches, args)


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


def attribution_setup(vlm, batch):
    study = AttributionStudy()
    groups = position_groups(batch, study.params.groups)  # [group, batch, pos]: the drawn cells per item
    per_group = max(1, study.params.cells // len(groups))
    n_cells = int((torch.clamp(groups.sum(-1) * vlm.cfg.n_layers, max=per_group)).sum(0).max())
    n = 2 + len(study.params.kinds) * (vlm.cfg.n_layers * len(groups) + n_cells)
    what = "1 clean + 1 corrupted (+ its backward) + kinds x (blocks x groups + drawn cells)"
    return study, n, what


def measure_estimate(vlm, batches, args) -> None:
    """Attribution's estimate alone (every block's resid_pre, every position) against 2 plain forwards."""
    names = hook_names(vlm, "resid_pre")

    def estimate() -> float:
        began = time.perf_counter()
        for _, batch in batches:  # the batch as clean and as corrupted: the time does not depend on values
            _, clean_acts = clean_run(vlm, batch, names)
            metric = LogitDifference(
                batch, torch.zeros(len(batch), dtype=torch.long), -torch.ones(len(batch), dtype=torch.long)
            )
            gradient_run(vlm, batch, names, metric)
        return time.perf_counter() - began

    def plain() -> float:
        began = time.perf_counter()
        for _, batch in batches:
            vlm(batch), vlm(batch)
        return time.perf_counter() - began

    estimate(), plain()  # warm-up
    times = {"estimate": [], "plain": []}
    for _ in range(args.repeats):  # round-robin
        times["estimate"].append(estimate())
        times["plain"].append(plain())
    best = {key: min(values) for key, values in times.items()}
    n_positions = max(batch.input_ids.shape[1] for _, batch in batches)
    print(
        f"  the estimate alone: {best['estimate']:.3f} s vs 2 plain forwards {best['plain']:.3f} s: "
        f"{best['estimate'] / best['plain']:.3f}x; exhaustive patching of the same cells: "
        f"{vlm.cfg.n_layers} x {n_positions} = {vlm.cfg.n_layers * n_positions} forwards a batch"
    )


STUDIES = {
    "knockout": knockout_setup,
    "pruning": pruning_setup,
    "object-ablation": object_ablation_setup,
    "attribution": attribution_setup,
}


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
