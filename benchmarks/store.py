"""Activation store: write throughput against the plain forward, peak memory against N, random reads.

    python benchmarks/store.py [--batch 8] [--repeats 8] [--sizes 64 512] [--read-batch 4096]

On the mid-size random LLaVA (576 image tokens, 8 layers of 512; CPU, float32), storing the image
positions of ``blocks.7.hook_resid_post`` (the last layer: the forward cannot stop early),
``blocks.3.hook_resid_post``, ``hook_visual_prefix`` and ``vision.blocks.1.hook_resid_post``:

1. one prepared batch, timed round-robin: the plain hooked forward (``vlm(batch)``), the
   store's capture alone (forward with the gathering hooks), capture + row metadata, and the whole
   store step (+ Arrow shard written and renamed); rows/s and MB/s written;
2. ``ActivationStore.write`` end to end (JPEG decoding and the processor in the main process) at
   N = 64 and 512 images: seconds and peak resident memory (should be flat in N);
3. random batches of ``--read-batch`` rows from the N = 512 store (memory-mapped, warm page cache):
   ``ActivationStore.rows`` and ``datasets``' ``with_format("torch")``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROMPT,
    image_folder,
    interleaved_times,
    mid_llava,
    peak_memory_mb,
    sample_images,
)

from hooked_vllm import HookedVLM  # noqa: E402
from hooked_vllm.activations.layout import capture, row_metadata, select_rows  # noqa: E402
from hooked_vllm.activations.run import StorePlan, _batch_columns  # noqa: E402
from hooked_vllm.activations.shards import write_shard  # noqa: E402
from hooked_vllm.activations.store import ActivationStore  # noqa: E402

HOOKS = [
    "blocks.7.hook_resid_post",
    "blocks.3.hook_resid_post",
    "hook_visual_prefix",
    "vision.blocks.1.hook_resid_post",
]


def write_overhead(vlm, batch_size: int, repeats: int) -> None:
    """One prepared batch, every variant once per round, ``repeats`` rounds: the best time of each, and
    the median over rounds of its ratio to the forward of the same round (robust to a shared CPU's
    drifting load)."""
    batch = vlm.prepare(sample_images(batch_size, seed=2), [PROMPT] * batch_size)
    plan = StorePlan.for_model(vlm, HOOKS, "image", None, PROMPT)
    ids = [f"item-{i:05d}" for i in range(batch_size)]
    written: dict[str, int] = {}

    def with_metadata() -> None:
        rows = select_rows(batch, "image", plan.layout)
        capture(vlm, batch, plan.hooks, rows, plan.layout)
        row_metadata(vlm, batch, rows, plan.layout)

    def store() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            columns, items, item_rows = _batch_columns(vlm, batch, list(range(batch_size)), ids, plan)
            path = write_shard(Path(tmp), 0, 0, plan.features.arrow_schema, columns, items, item_rows, {})
            written.update(bytes=path.stat().st_size, rows=sum(item_rows))

    variants = {
        "forward": lambda: vlm(batch),
        "capture": lambda: capture(
            vlm, batch, plan.hooks, select_rows(batch, "image", plan.layout), plan.layout
        ),
        "capture+metadata": with_metadata,
        "store step": store,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()
        for _ in range(repeats):
            for name, fn in variants.items():
                gc.collect()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    print(
        f"mid-size LLaVA, batch {batch_size} ({batch.input_ids.shape[1]} positions, 576 image), CPU float32, "
        f"torch {torch.__version__}, {repeats} rounds; hooks {', '.join(HOOKS)} at image positions"
    )
    base = times["forward"]
    for name, ts in times.items():
        ratio = float(np.median([t / f for t, f in zip(ts, base)]))
        print(
            f"  {name:18s} best {min(ts) * 1000:8.1f} ms ({min(ts) / min(base):5.3f}x)   "
            f"median of per-round ratios {ratio:5.3f}x forward"
        )
    columns, items, item_rows = _batch_columns(vlm, batch, list(range(batch_size)), ids, plan)
    rows = select_rows(batch, "image", plan.layout)

    def shard_only() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_shard(Path(tmp), 0, 0, plan.features.arrow_schema, columns, items, item_rows, {})

    parts = {
        "metadata alone": lambda: row_metadata(vlm, batch, rows, plan.layout),
        "Arrow shard alone": shard_only,
    }
    for name, seconds in interleaved_times(parts, repeats=repeats).items():
        print(f"  {name:18s} best {seconds * 1000:8.1f} ms ({seconds / min(base):5.3f}x)")
    seconds = min(times["store step"])
    print(
        f"  written: {written['rows'] / seconds:,.0f} rows/s, {written['bytes'] / seconds / 1e6:,.1f} MB/s "
        f"({written['bytes'] / written['rows']:,.0f} B/row, {written['bytes'] / 1e6:.1f} MB per batch)"
    )


def scale(vlm, sizes: list[int], batch_size: int, keep: Path) -> Path:
    """End-to-end writes at each N: seconds and peak memory (the probe slows allocation a little)."""
    last = keep
    for n in sizes:
        sample = image_folder(n, Path(tempfile.mkdtemp(dir=keep)))
        out = keep / f"store-{n}"
        timing: dict[str, float] = {}

        def run(sample=sample, out=out, timing=timing) -> None:
            start = time.perf_counter()
            ActivationStore.write(vlm, sample, out, hooks=HOOKS, batch_size=batch_size, progress=False)
            timing["s"] = time.perf_counter() - start

        peak = peak_memory_mb(run)
        size = sum(p.stat().st_size for p in out.glob("data-b*.arrow"))
        print(
            f"  write N={n:4d}: {timing['s']:7.1f} s  {n / timing['s']:5.2f} images/s  {size / 1e9:6.2f} GB  "
            f"peak +{peak:6.0f} MiB"
        )
        last = out
    return last


def reads(path: Path, batch: int, repeats: int) -> None:
    store = ActivationStore.open(path)
    as_torch = store.dataset.with_format("torch", columns=[HOOKS[0]])
    rng = np.random.default_rng(0)
    index_sets = [rng.integers(0, len(store), batch) for _ in range(repeats)]
    width = store.dataset.features[HOOKS[0]].length
    for name, read in (
        ("ActivationStore.rows", lambda idx: store.rows(idx, columns=[HOOKS[0]])),
        ("datasets torch format", lambda idx: as_torch[idx.tolist()]),
    ):
        read(index_sets[0])
        best = min(_timed(read, idx) for idx in index_sets)
        print(
            f"  random {batch} rows of {HOOKS[0]} ({len(store):,} rows, {name}): {best * 1000:6.1f} ms, "
            f"{batch / best:,.0f} rows/s, {batch * width * 4 / best / 1e6:,.0f} MB/s"
        )


def _timed(fn, arg) -> float:
    start = time.perf_counter()
    fn(arg)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=8, help="rounds of part 1")
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 512])
    parser.add_argument("--read-batch", type=int, default=4096)
    args = parser.parse_args()
    torch.manual_seed(0)
    vlm = HookedVLM.from_hf(*mid_llava())
    write_overhead(vlm, args.batch, args.repeats)
    if args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            last = scale(vlm, args.sizes, args.batch, Path(tmp))
            reads(last, args.read_batch, 5)


if __name__ == "__main__":
    main()
