"""Dataset-scale runs: items per second and peak memory against N (memory should stay flat in N,
time grow linearly).

    python benchmarks/dataset.py [--sizes 8 32 128] [--mid-sizes 8 32]

Runs `run_phase_diagram` (collector + per-batch parquet writes + aggregation) on synthetic images
saved to disk, with the tiny and the mid-size random LLaVA, CPU, batch size 8.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image_folder, mid_llava, peak_memory_mb  # noqa: E402

from hooked_vllm import HookedVLM  # noqa: E402
from hooked_vllm.runs.phase_diagram import run_phase_diagram  # noqa: E402
from hooked_vllm.testing import TinyTextConfig, tiny_llava  # noqa: E402


def measure(vlm, sizes: list[int], label: str) -> None:
    """Time one run, then measure the peak of a second (the memory probe slows allocation)."""
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            sample = image_folder(n, Path(tmp))
            start = time.perf_counter()
            run_phase_diagram(vlm, sample, Path(tmp) / "timed", batch_size=8, progress=False)
            seconds = time.perf_counter() - start
            peak = peak_memory_mb(
                lambda sample=sample, out=Path(tmp) / "measured": run_phase_diagram(
                    vlm, sample, out, batch_size=8, progress=False
                )
            )
        print(f"{label:10s} N={n:4d}  {seconds:7.1f} s  {n / seconds:6.2f} items/s  peak +{peak:6.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--mid-sizes", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    tiny = tiny_llava(image_size=336, patch_size=14, text=TinyTextConfig(n_ctx=1024))
    measure(HookedVLM.from_hf(*tiny), args.sizes, "tiny")
    measure(HookedVLM.from_hf(*mid_llava()), args.mid_sizes, "mid-size")


if __name__ == "__main__":
    main()
