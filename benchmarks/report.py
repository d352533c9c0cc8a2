"""Report size and build time against the number of items (it should stay flat in N: the dataset
figures hold per-layer means and only the explored items carry per-item data).

    python benchmarks/report.py [--sizes 16 256 4096] [--report-items 8]

The mid-size random LLaVA (576 image tokens, 8 layers x 8 heads) runs the phase diagram on 16
synthetic images; their rows are repeated (new item ids, the dataset sums scaled alike) to N items,
which is what the report is built from: aggregation over N rows, the explorer's two passes over
``--report-items`` items, and the HTML. Also: the bytes one explored item adds at LLaVA-1.5-7B's
shape (32 layers x 32 heads x 576 patches), measured on the encoding of random maps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_time, image_folder, mid_llava, peak_memory_mb, sample_images  # noqa: E402

from hooked_vllm import HookedVLM  # noqa: E402
from hooked_vllm.report.explorer import ItemView, explore_items, explorer_pass, payload, spread  # noqa: E402
from hooked_vllm.report.html import write_report  # noqa: E402
from hooked_vllm.runs.phase_diagram import aggregate, run_phase_diagram  # noqa: E402
from hooked_vllm.runs.store import ResultStore  # noqa: E402


def repeated(rows: list[dict], sums: dict, n: int) -> tuple[list[dict], dict]:
    """``n`` rows cycling through ``rows`` under new ids, and the dataset sums of those ``n``."""
    out = [dict(rows[k % len(rows)], item_id=f"{rows[k % len(rows)]['item_id']}-{k:05d}") for k in range(n)]
    counts = np.bincount(np.arange(n) % len(rows), minlength=len(rows))
    assert (counts == counts[0]).all(), "n must be a multiple of the base rows"
    return out, {key: value * counts[0] for key, value in sums.items()}


def explored_item_bytes(n_layers: int, n_heads: int, n_patches: int) -> int:
    rng = np.random.default_rng(0)
    maps = rng.gamma(2.0, 1.0, (n_layers, n_heads + 1, n_patches)).astype(np.float32)
    view = ItemView(
        item_id="x",
        instruction="",
        thumbnail="",
        tokens=[],
        modalities=[],
        tiles=[],
        saliency={"text": maps, "last": maps},
        lens_grid=rng.integers(0, 32000, (n_layers + 1, n_patches)),
        lens_last_tokens=rng.integers(0, 32000, (n_layers + 1, 5)),
        lens_last_probs=rng.random((n_layers + 1, 5)),
    )

    class Words:
        def decode(self, ids):
            return f"w{ids[0]}"

    import json

    return len(json.dumps(payload([view], Words()), separators=(",", ":")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--report-items", type=int, default=8)
    args = parser.parse_args()
    vlm = HookedVLM.from_hf(*mid_llava())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sample = image_folder(16, tmp)
        start = time.perf_counter()
        run_phase_diagram(vlm, sample, tmp / "run", batch_size=8, progress=False)
        print(f"phase diagram of 16 items (for reference): {time.perf_counter() - start:.1f} s")
        rows, sums = ResultStore(tmp / "run").read()
        by_id = {item.item_id: item for item in sample.items}
        print("items | aggregate s | explorer s | write s | report MB | report MB with --report-items 0")
        for n in args.sizes:
            many, many_sums = repeated(rows, sums, n)
            start = time.perf_counter()
            aggregates = aggregate(many, many_sums)
            t_aggregate = time.perf_counter() - start
            chosen = spread([row["item_id"] for row in many], args.report_items)
            start = time.perf_counter()
            views = explore_items(vlm, [by_id[item_id.rsplit("-", 1)[0]] for item_id in chosen])
            t_explore = time.perf_counter() - start
            start = time.perf_counter()
            path = write_report(tmp / "run", aggregates, many, vlm.tokenizer, title="bench", explorer=views)
            t_write = time.perf_counter() - start
            size = path.stat().st_size / 1e6
            bare = (
                write_report(tmp / "run", aggregates, many, vlm.tokenizer, title="bench").stat().st_size / 1e6
            )
            print(
                f"{n:5d} | {t_aggregate:11.2f} | {t_explore:10.2f} | {t_write:7.2f} | {size:9.2f} "
                f"| {bare:.2f}"
            )
    batch = vlm.prepare(sample_images(4), ["Describe the image in one sentence."] * 4)
    print("explorer pass, batch 4 (628 positions): attention path | best of 3 s | peak MiB")
    for path in ("pattern", "fused"):
        seconds = best_time(lambda path=path: explorer_pass(vlm, batch, attention=path), repeats=3)
        memory = peak_memory_mb(lambda path=path: explorer_pass(vlm, batch, attention=path))
        print(f"{path:7s} | {seconds:.2f} | {memory:.0f}")
    for label, shape in (("mid LLaVA", (8, 8, 576)), ("LLaVA-1.5-7B", (32, 32, 576))):
        print(f"one explored item at {label}'s shape {shape}: {explored_item_bytes(*shape) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
