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
                {
                    "answer": example.answer,
                    "kind": example.kind,
                    "objects": [scene_object(shape) for shape in example.scene],
                    "asked": asked_objects(example),
                },
            )
        )
    return DatasetSample("shapes", items)


def scene_object(shape: shapes.Shape) -> dict:
    """One shape as an object of the image: its name, its colour and its box ``[x0, y0, x1, y1]`` as
    fractions of the image's width and height (what the object-ablation study maps to image tokens)."""
    box = [shape.x - shape.size, shape.y - shape.size, shape.x + shape.size, shape.y + shape.size]
    return {"name": shape.kind, "colour": shape.colour, "box": [v / shapes.IMAGE_SIZE for v in box]}


def asked_objects(example: shapes.Example) -> list[int]:
    """The indices (into the scene) of the objects the question is about: the shape it names, or the
    one of the colour it names; every shape for a count question."""
    if example.kind == "count":
        return list(range(len(example.scene)))
    words = set(example.question.split())
    return [i for i, s in enumerate(example.scene) if s.kind in words or s.colour in words]
