"""Datasets from local files in their published formats; nothing is downloaded.

- **COCO captions**: ``annotations/captions_val2014.json`` (or ``captions_val2017.json``) and the
  image folder (``val2014/`` or ``val2017/``) under ``data_dir``. Each sampled image becomes one item
  with the captioning instruction.
- **Winoground**: ``examples.jsonl`` and ``images/`` under ``data_dir`` (400 examples of two images
  and two captions). Each example becomes four items: each image with each caption.
- **samples**: the free-licensed photographs shipped with the package (the offline default).
- **shapes**: the synthetic shapes task the demo model was trained on.

Items are sampled with a seeded RNG (the paper samples validation images at random). Paths in
annotations that point outside ``data_dir``, missing or corrupt images and empty datasets are errors;
``skip_bad=True`` skips missing/corrupt images and lists them in ``DatasetSample.skipped``.

Example:
    >>> sample = load_dataset("samples", n=2, seed=0)
    >>> len(sample.items)
    2
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hooked_vllm.errors import HookedVLMError, ImageLoadError
from hooked_vllm.images import load_image

CAPTION_INSTRUCTION = "Describe the image in one sentence."
WINOGROUND_TEMPLATE = 'Does the caption "{caption}" describe the image?'
SAMPLES_DIR = Path(__file__).parent / "samples"


class DatasetError(HookedVLMError):
    """A dataset folder or annotation file is missing, malformed or unsafe."""


@dataclass(frozen=True)
class DatasetItem:
    """One prompt: an image file and an instruction, with a unique id."""

    item_id: str
    image_path: Path
    instruction: str
    meta: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class DatasetSample:
    name: str
    items: list[DatasetItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _inside(data_dir: Path, relative: str, what: str) -> Path:
    path = (data_dir / relative).resolve()
    if not path.is_relative_to(data_dir.resolve()):
        raise DatasetError(
            f"{what} {relative!r} points outside the data folder {data_dir}. Annotation paths must be "
            "relative to the dataset folder; fix the annotation file."
        )
    return path


def _check_images(
    items: list[DatasetItem], skip_bad: bool
) -> tuple[list[DatasetItem], list[tuple[str, str]]]:
    """Open every distinct image once; raise on the first bad one unless ``skip_bad``."""
    bad: dict[Path, str] = {}
    for path in sorted({item.image_path for item in items}):
        try:
            load_image(path)
        except ImageLoadError as exc:
            if not skip_bad:
                raise ImageLoadError(f"{exc} (pass --skip-bad to skip such images and list them)") from exc
            bad[path] = str(exc)
    kept = [item for item in items if item.image_path not in bad]
    return kept, [(str(path), reason) for path, reason in bad.items()]


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    order = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


def load_coco(
    data_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    instruction: str = CAPTION_INSTRUCTION,
    skip_bad: bool = False,
) -> DatasetSample:
    """``n`` random images of COCO captions (val2014 or val2017) with the captioning instruction."""
    data_dir = Path(data_dir)
    candidates = [data_dir / "annotations" / f"captions_val{year}.json" for year in (2014, 2017)]
    annotation = next((path for path in candidates if path.is_file()), None)
    if annotation is None:
        raise DatasetError(
            f"No COCO captions file under {data_dir}: expected annotations/captions_val2014.json or "
            "annotations/captions_val2017.json (from the COCO 2014/2017 annotations archive)."
        )
    try:
        data = json.loads(annotation.read_text())
        images = data["images"]
        captions: dict[int, list[str]] = {}
        for ann in data.get("annotations", []):
            captions.setdefault(ann["image_id"], []).append(ann["caption"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DatasetError(f"{annotation} is not a COCO captions file ({exc}).") from exc
    folder = "val2014" if "2014" in annotation.name else "val2017"
    items = [
        DatasetItem(
            item_id=f"coco-{image['id']}",
            image_path=_inside(data_dir, f"{folder}/{image['file_name']}", "Image file_name"),
            instruction=instruction,
            meta={"captions": captions.get(image["id"], [])},
        )
        for image in images
    ]
    if not items:
        raise DatasetError(f"{annotation} lists no images.")
    items, skipped = _check_images(_sample(items, n, seed), skip_bad)
    return DatasetSample("coco", items, skipped)


def load_winoground(
    data_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    template: str = WINOGROUND_TEMPLATE,
    skip_bad: bool = False,
) -> DatasetSample:
    """``n`` random Winoground examples, each as four items (image_i with caption_j)."""
    data_dir = Path(data_dir)
    examples_file = data_dir / "examples.jsonl"
    if not examples_file.is_file():
        raise DatasetError(
            f"No Winoground examples at {examples_file}: expected examples.jsonl and images/ "
            "(the layout of the facebook/winoground dataset files)."
        )
    examples = []
    for line_no, line in enumerate(examples_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            examples.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{examples_file}:{line_no} is not valid JSON ({exc}).") from exc
    if not examples:
        raise DatasetError(f"{examples_file} holds no examples.")
    items = []
    for ex in _sample(examples, n, seed):
        try:
            images = [ex["image_0"], ex["image_1"]]
            texts = [ex["caption_0"], ex["caption_1"]]
            ex_id = ex["id"]
        except KeyError as exc:
            raise DatasetError(f"Winoground example lacks field {exc}: {ex}") from exc
        for i, image in enumerate(images):
            name = image if Path(image).suffix else f"{image}.png"
            path = _inside(data_dir, f"images/{name}", "Image")
            for j, text in enumerate(texts):
                items.append(
                    DatasetItem(
                        item_id=f"winoground-{ex_id}-i{i}-c{j}",
                        image_path=path,
                        instruction=template.format(caption=text),
                        meta={"example": ex_id, "image": i, "caption": j, "match": i == j},
                    )
                )
    items, skipped = _check_images(items, skip_bad)
    return DatasetSample("winoground", items, skipped)


def load_samples(
    n: int | None = None, seed: int = 0, *, instruction: str = CAPTION_INSTRUCTION
) -> DatasetSample:
    """The photographs shipped with the package (see ``data/samples/LICENSES.md``)."""
    paths = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    items = [DatasetItem(f"sample-{p.stem}", p, instruction) for p in paths]
    return DatasetSample("samples", _sample(items, n, seed))


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    *,
    skip_bad: bool = False,
) -> DatasetSample:
    """Dispatch on ``name``: ``coco``, ``winoground`` or ``samples``."""
    if name == "samples":
        return load_samples(n, seed)
    if data_dir is None:
        raise DatasetError(f"--data-dir is required for the {name!r} dataset.")
    if name == "coco":
        return load_coco(data_dir, n, seed, skip_bad=skip_bad)
    if name == "winoground":
        return load_winoground(data_dir, n, seed, skip_bad=skip_bad)
    raise DatasetError(f"Unknown dataset {name!r}; choose coco, winoground or samples.")
