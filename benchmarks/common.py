"""Shared pieces of the benchmarks: a mid-size random LLaVA and a timer."""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hooked_vllm.runs.datasets import DatasetItem, DatasetSample
from hooked_vllm.testing import TinyTextConfig, tiny_llava

MID_TEXT = TinyTextConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1376, n_ctx=2048)
PROMPT = "Describe the image in one sentence, naming the main objects and their colours."


def mid_llava(seed: int = 0):
    """LLaVA-architecture model: 336px / patch 14 -> 576 image tokens, 8 LLaMA layers of 512."""
    return tiny_llava(seed=seed, text=MID_TEXT, image_size=336, patch_size=14)


def sample_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((336, 336, 3)) * 255).astype("uint8")) for _ in range(n)]


def image_folder(n: int, directory: Path) -> DatasetSample:
    """``n`` synthetic 336-px JPEGs written to ``directory``, as a dataset sample."""
    items = []
    for i, image in enumerate(sample_images(n, seed=1)):
        path = directory / f"img-{i:05d}.jpg"
        image.save(path)
        items.append(DatasetItem(f"item-{i:05d}", path, "Describe the image in one sentence."))
    return DatasetSample("synthetic", items)


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls, in seconds (the least noisy estimate on a shared CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; nothing to do on the CPU)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(
    fns: dict[str, Callable[[], object]], repeats: int = 5, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Best time of each function, measured round-robin so machine noise hits all alike (on CUDA,
    from an idle device to the end of the call's GPU work)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) for name, ts in times.items()}


torch.set_grad_enabled(False)


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak resident memory that ``fn`` adds on top of what is resident now, in MiB (CPU, Linux).

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) before the call and reads
    ``VmHWM`` after it. On CUDA use ``torch.cuda.max_memory_allocated`` instead.
    """
    gc.collect()
    with _large_allocations_mmapped():
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        base = _status_kb("VmRSS")
        fn()
        return max(_status_kb("VmHWM") - base, 0) / 1024


@contextmanager
def _large_allocations_mmapped():
    """For the duration, glibc serves every allocation over 128 KiB with a fresh mmap, returned to
    the OS on free, and free heap pages are handed back first (malloc_trim): without both, glibc
    reuses resident heap pages after large frees, and a peak reads as ~0 MiB. Only while memory is
    measured: the page faults it costs would otherwise slow allocation-heavy code (3x on the
    attention lenses) and bias the timings."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: readings may under-count
        yield
        return
    malloc_trim(0)  # free heap pages leave the resident set: reusing them counts again
    mmap_threshold = -3  # M_MMAP_THRESHOLD
    mallopt(mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        mallopt(mmap_threshold, 32 * 1024 * 1024)  # glibc's own ceiling for its dynamic threshold


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0
