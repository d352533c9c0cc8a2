"""The synthetic shapes task as a dataset: held-out scenes rendered to PNG files, each with one of
its questions as the instruction (the demo model's own task)."""

from __future__ import annotations

from pathlib import Path

from hooked_vllm.demo import shapes
from hooked_vllm.runs.datasets import DatasetError, DatasetItem, DatasetSample, check_n
from hooked_vllm.runs.files import atomic_path

HELD_OUT_SEED = shapes.HELD_OUT_SEED_BASE + 10_000


def load_shapes(directory: str | Path, n: int = 16, seed: int = 0) -> DatasetSample:
    """``n`` held-out examples (seeded; never seen in training), images written under ``directory``.
    ``n`` must be at least 1 (:class:`~hooked_vllm.runs.datasets.DatasetError` otherwise)."""
    check_n(n)
    if n is None:
        raise DatasetError("--n must be at least 1 for the shapes dataset (it has no fixed size).")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i, example in enumerate(shapes.examples(seed=HELD_OUT_SEED + 7919 * seed + 1, n=n)):
        path = directory / f"shapes-{seed}-{i:05d}.png"
        if not path.is_file():
            with atomic_path(path) as tmp:  # a failed write never leaves a truncated image to resume on
                example.image.save(tmp)
        items.append(
            DatasetItem(
                f"shapes-{seed}-{i:05d}",
                path,
                example.question,
                {"answer": example.answer, "kind": example.kind},
            )
        )
    return DatasetSample("shapes", items)
