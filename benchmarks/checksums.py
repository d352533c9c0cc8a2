"""What the stores' content checksums cost: writing and opening a 1 GB activation store.

    python benchmarks/checksums.py [--gb 1.0] [--width 1024] [--repeats 3]

Builds an activation store of ``--gb`` GB through the store's own writer (``ShardWriter``: shards of
4 items x 576 image rows of one float32 hook of ``--width``, no model), then times, interleaved:

1. ``ActivationStore.open(verify=True)`` (every shard's SHA-256 checked) against ``verify=False``,
   with the page cache warm (the store was just written or read);
2. the same after dropping the page cache, where the machine allows it (root, /proc/sys/vm);
3. the share of the write spent hashing (SHA-256 of every shard, timed alone).

The phase-diagram store's parts are a few KB per batch of items: their checksums cost microseconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from hooked_vllm.activations.layout import MODALITIES
from hooked_vllm.activations.shards import ShardWriter, features
from hooked_vllm.activations.store import ActivationStore
from hooked_vllm.runs.checksums import file_sha256

ROWS_PER_ITEM, ITEMS_PER_SHARD = 576, 4


def build_store(folder: Path, gb: float, width: int) -> tuple[float, int]:
    """Write a store of about ``gb`` GB; returns (seconds, shards)."""
    hook = "blocks.0.hook_resid_post"
    shard_bytes = ROWS_PER_ITEM * ITEMS_PER_SHARD * width * 4
    n_shards = max(1, round(gb * 1e9 / shard_bytes))
    feats = features({hook: width}, "float32")

    def expected(batch: int) -> list[str] | None:
        if batch >= n_shards:
            return None
        return [f"item-{batch * ITEMS_PER_SHARD + i:06d}" for i in range(ITEMS_PER_SHARD)]

    settings = {"hooks": [hook], "positions": "image", "dtype": "float32", "benchmark": True}
    writer = ShardWriter(folder, 0, settings, feats, expected, description="checksum benchmark").open()
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ROWS_PER_ITEM * ITEMS_PER_SHARD, width), dtype=np.float32)
    rows = ROWS_PER_ITEM * ITEMS_PER_SHARD
    start = time.perf_counter()
    for batch in range(n_shards):
        ids = expected(batch)
        columns = {
            "item_id": [i for i in ids for _ in range(ROWS_PER_ITEM)],
            "item_index": np.repeat(np.arange(batch * 4, batch * 4 + 4, dtype=np.int64), ROWS_PER_ITEM),
            "position": np.tile(np.arange(1, ROWS_PER_ITEM + 1, dtype=np.int32), ITEMS_PER_SHARD),
            "modality": np.full(rows, MODALITIES.index("image"), dtype=np.int64),
            "image_index": np.zeros(rows, dtype=np.int32),
            "patch": np.tile(np.arange(ROWS_PER_ITEM, dtype=np.int32), ITEMS_PER_SHARD),
            "grid_row": np.tile(np.arange(ROWS_PER_ITEM, dtype=np.int32) // 24, ITEMS_PER_SHARD),
            "grid_col": np.tile(np.arange(ROWS_PER_ITEM, dtype=np.int32) % 24, ITEMS_PER_SHARD),
            "tile": np.full(rows, -1, dtype=np.int32),
            "token_id": np.full(rows, 32000, dtype=np.int32),
            "token": ["<image>"] * rows,
            hook: vectors,
        }
        writer.write(batch, columns, ids, [ROWS_PER_ITEM] * ITEMS_PER_SHARD)
    writer.publish()
    seconds = time.perf_counter() - start
    writer.close()
    return seconds, n_shards


def drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_open(folder: Path, verify: bool) -> float:
    start = time.perf_counter()
    store = ActivationStore.open(folder, verify=verify) if verify else ActivationStore(folder, verify=False)
    seconds = time.perf_counter() - start
    del store
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="checksum-bench-") as tmp:
        folder = Path(tmp) / "store"
        write_s, n_shards = build_store(folder, args.gb, args.width)
        shards = sorted(folder.glob("data-b*.arrow"))
        size = sum(p.stat().st_size for p in shards)
        print(f"store: {n_shards} shards, {size / 1e9:.2f} GB, written in {write_s:.1f} s")
        start = time.perf_counter()
        for shard in shards:
            file_sha256(shard)
        hash_s = time.perf_counter() - start
        print(
            f"SHA-256 of every shard alone: {hash_s:.2f} s ({size / 1e9 / hash_s:.2f} GB/s), "
            f"{100 * hash_s / write_s:.0f}% of the write"
        )
        warm = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                warm[verify].append(timed_open(folder, verify))
        print(
            f"open, warm page cache (best of {args.repeats}): verify=False {min(warm[False]):.2f} s, "
            f"verify=True {min(warm[True]):.2f} s (+{min(warm[True]) - min(warm[False]):.2f} s, "
            f"{(min(warm[True]) - min(warm[False])) / (size / 1e9):.2f} s per GB)"
        )
        if drop_page_cache():
            cold = {True: [], False: []}
            for _ in range(args.repeats):
                for verify in (False, True):
                    drop_page_cache()
                    cold[verify].append(timed_open(folder, verify))
            print(
                f"open, cold page cache (best of {args.repeats}): verify=False {min(cold[False]):.2f} s, "
                f"verify=True {min(cold[True]):.2f} s (+{min(cold[True]) - min(cold[False]):.2f} s)"
            )
        else:
            print("open, cold page cache: not measured (cannot drop the page cache here)")


if __name__ == "__main__":
    main()
