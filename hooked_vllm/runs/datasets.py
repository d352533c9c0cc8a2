"""Datasets from local files in their published formats; nothing is downloaded.

- **COCO captions**: ``annotations/captions_val2014.json`` (or ``captions_val2017.json``) and the
  image folder (``val2014/`` or ``val2017/``) under ``data_dir``. Each sampled image becomes one item
  with the captioning instruction.
- **Winoground**: ``examples.jsonl`` and the images (400 examples of two images and two captions);
  each example becomes four items: each image with each caption. ``data_dir`` is either a folder
  with ``examples.jsonl`` and ``images/``, or the files of the facebook/winoground dataset repository
  as downloaded: ``data/examples.jsonl`` and ``data/images.zip`` (or an extracted ``data/images/``),
  including the Hugging Face hub cache's layout, where ``data_dir`` may be a snapshot folder
  (``.../datasets--facebook--winoground/snapshots/<revision>``) or the
  ``datasets--facebook--winoground`` folder itself (its one snapshot is used; several are refused,
  listed). Images in ``images.zip`` are read from the archive, never extracted: their
  ``DatasetItem.image_path`` is ``<zip>::images/<name>.png``, which
  :func:`hooked_vllm.model.images.load_image` reads.
- **samples**: the free-licensed photographs shipped with the package (the offline default).
- **folder**: every image file under a folder, one instruction for all (the activation store's
  ``--dataset folder``).
- **shapes**: the synthetic shapes task the demo model was trained on.

Every field used is checked when the files are read, and :class:`DatasetError` names the file, the
entry and the fix: ids must be integers or non-empty strings and unique (a duplicate would give two
items one id), file names and captions non-empty strings. Image names in annotation files must stay
inside their folder *lexically*: relative, without ``..`` components, a leading ``/``, drive letters
(``:``) or backslashes. They are not resolved, so symlinks that the folder's owner placed inside it
(``val2014 -> /data/coco/val2014``) are followed.

Items are sampled with a seeded RNG (the paper samples validation images at random). Missing or
corrupt images (and images over the pixel limit ``max_pixels``, see :mod:`hooked_vllm.model.images`) and
empty datasets are errors; ``skip_bad=True`` skips missing/corrupt images and lists them in
``DatasetSample.skipped``. ``n`` is ``None`` (everything) or at least 1.

Example:
    >>> sample = load_dataset("samples", n=2, seed=0)
    >>> len(sample.items)
    2
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hooked_vllm.errors import HookedVLMError, ImageLoadError
from hooked_vllm.model.batch import PREPARE_ERRORS
from hooked_vllm.model.images import load_image, zip_member_path
from hooked_vllm.runs.constants import CAPTION_INSTRUCTION, DATASETS, WINOGROUND_TEMPLATE

SAMPLES_DIR = Path(__file__).parent / "samples"
WINOGROUND_HUB_FOLDER = "datasets--facebook--winoground"


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
    """The items of a run; ``max_pixels`` is the image pixel limit the loader was given (``None``:
    the default of :mod:`hooked_vllm.model.images`), for whoever decodes the images later;
    ``skip_bad`` whether items found bad later (:func:`screen_items`, the processor) are skipped
    and listed in ``skipped`` too, or refused."""

    name: str
    items: list[DatasetItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or item id, reason)
    max_pixels: int | None = None
    skip_bad: bool = False


class BadItemError(DatasetError):
    """A dataset item the model cannot take: text holding an image placeholder or not encodable,
    an image or a prompt the processor refuses."""


# ---------------------------------------------------------------- checks shared by the readers
def check_n(n: int | None) -> None:
    """``n`` is ``None`` (every item) or a positive integer."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DatasetError(f"--n must be at least 1 (or left out for the whole dataset); got {n!r}.")


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text ({exc}); re-download it from its source.") from exc
    except OSError as exc:
        raise DatasetError(f"Could not read {path}: {exc}. Check the file and its permissions.") from exc


def _parse_json(text: str, where: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise DatasetError(
            f"{where} is not valid JSON ({exc}). The file is truncated or corrupt; re-download it."
        ) from exc


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _field(entry: dict, key: str, where: str, *, kind: str):
    """``entry[key]``, checked: ``kind`` is ``"id"`` (an int or a non-empty string) or ``"text"`` (a
    non-empty string)."""
    if key not in entry:
        raise DatasetError(f"{where} lacks the field {key!r}; fix the annotation file.")
    value = entry[key]
    if kind == "id":
        ok = (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value)
        expected = "an integer or a non-empty string"
    else:
        ok = isinstance(value, str) and bool(value.strip())
        expected = "a non-empty string"
    if not ok:
        raise DatasetError(
            f"{where}: {key!r} must be {expected}; got {_describe(value)}. Fix the annotation file."
        )
    return value


def _relative_name(name: str, folder: Path, where: str, what: str) -> str:
    """``name`` if it stays inside ``folder`` lexically. Not resolved: symlinks inside are followed."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or ":" in name or "\0" in name or ".." in parts:
        raise DatasetError(
            f"{where}: {what} {name!r} points outside the data folder {folder}. Annotation paths must "
            "be relative to the dataset folder (no leading '/', '..', drive letter or backslash); fix "
            "the annotation file."
        )
    return name


def _unique(item_id: str, seen: dict[str, str], where: str, what: str) -> None:
    if item_id in seen:
        raise DatasetError(
            f"{where}: {what} is also used by {seen[item_id]}; each needs its own id (results are "
            "stored by id). Fix or deduplicate the annotation file."
        )
    seen[item_id] = where


def _check_images(
    items: list[DatasetItem], skip_bad: bool, max_pixels: int | None = None
) -> tuple[list[DatasetItem], list[tuple[str, str]]]:
    """Open every distinct image once; raise on the first bad one unless ``skip_bad``."""
    bad: dict[Path, str] = {}
    for path in sorted({item.image_path for item in items}):
        try:
            load_image(path, max_pixels=max_pixels)
        except ImageLoadError as exc:
            if not skip_bad:
                raise ImageLoadError(f"{exc} (pass --skip-bad to skip such images and list them)") from exc
            bad[path] = str(exc)
    kept = [item for item in items if item.image_path not in bad]
    return kept, [(str(path), reason) for path, reason in bad.items()]


def _text_problem(text: str, markers: Sequence[str]) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (
            f"its text cannot be encoded ({exc.reason}: {text[exc.start : exc.end]!r} at character "
            f"{exc.start}), so no tokenizer can read it; fix the text in the dataset"
        )
    found = next((marker for marker in markers if marker in text), None)
    if found is None:
        return None
    return (
        f"its text holds {found!r}, which the model reads as an image placeholder (the image would "
        "land inside the text); dataset text is text: remove or reword it in the dataset"
    )


def bad_item(sample: DatasetSample, item: DatasetItem, problem: str) -> tuple[str, str]:
    """``(item id, reason)`` to list under ``sample.skipped`` where ``sample.skip_bad``; else raise
    :class:`BadItemError` naming the item and ``problem``."""
    reason = f"Item {item.item_id} ({item.image_path}): {problem}"
    if not sample.skip_bad:
        raise BadItemError(f"{reason} (pass --skip-bad to skip such items and list them)")
    return item.item_id, reason


def screen_items(vlm, sample: DatasetSample, *, processor: bool = False) -> DatasetSample:
    """Refuse, or skip and list where ``sample.skip_bad``, the items ``vlm`` cannot take as text:
    text that is not encodable, or that holds one of the model's image placeholders
    (``vlm.adapter.prompt_markers``: it would move the image into the text). ``processor=True`` also
    prepares each item alone (its image decoded) and refuses those the processor rejects, for runs
    whose batches are fixed before they start. ``sample`` is updated in place and returned; a sample
    left empty is an error."""
    kept = []
    for item in sample.items:
        problem = _text_problem(item.instruction, vlm.adapter.prompt_markers)
        if problem is None and processor:
            try:
                vlm.prepare([load_image(item.image_path, max_pixels=sample.max_pixels)], [item.instruction])
            except PREPARE_ERRORS as exc:
                problem = refused(exc)
        if problem is None:
            kept.append(item)
        else:
            sample.skipped.append(bad_item(sample, item, problem))
    if sample.items and not kept:
        first = sample.skipped[-len(sample.items)][1]
        raise BadItemError(f"Every item of the {sample.name} sample is bad; the first: {first}")
    sample.items[:] = kept
    return sample


def refused(exc: Exception) -> str:
    """What the processor said about an item it rejected, on one line."""
    return f"the processor refuses it ({type(exc).__name__}: {' '.join(str(exc).split())})"


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    order = np.random.default_rng(seed).permutation(len(items))[:n]
    return [items[i] for i in sorted(order)]


# ---------------------------------------------------------------- COCO captions
def _coco_captions(annotations, annotation: Path) -> dict:
    if not isinstance(annotations, list):
        raise DatasetError(
            f"{annotation}: 'annotations' must be a list of caption entries; got "
            f"{_describe(annotations)}. Use the COCO captions file as published."
        )
    captions: dict = {}
    for k, ann in enumerate(annotations):
        where = f"{annotation}, annotations[{k}]"
        if not isinstance(ann, dict):
            raise DatasetError(
                f"{where} must be an object with 'image_id' and 'caption'; got {_describe(ann)}."
            )
        image_id = _field(ann, "image_id", where, kind="id")
        captions.setdefault(image_id, []).append(_field(ann, "caption", where, kind="text"))
    return captions


def load_coco(
    data_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    instruction: str = CAPTION_INSTRUCTION,
    skip_bad: bool = False,
    max_pixels: int | None = None,
) -> DatasetSample:
    """``n`` random images of COCO captions (val2014 or val2017) with the captioning instruction."""
    check_n(n)
    data_dir = Path(data_dir).absolute()
    candidates = [data_dir / "annotations" / f"captions_val{year}.json" for year in (2014, 2017)]
    annotation = next((path for path in candidates if path.is_file()), None)
    if annotation is None:
        raise DatasetError(
            f"No COCO captions file under {data_dir}: expected annotations/captions_val2014.json or "
            "annotations/captions_val2017.json (from the COCO 2014/2017 annotations archive)."
        )
    data = _parse_json(_read_text(annotation), str(annotation))
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        got = _describe(data.get("images")) if isinstance(data, dict) else f"a top level {_describe(data)}"
        raise DatasetError(
            f"{annotation} is not a COCO captions file: expected an object whose 'images' is a list of "
            f"{{'id', 'file_name'}} entries; got {got}. Use the file as published."
        )
    captions = _coco_captions(data.get("annotations", []), annotation)
    folder = data_dir / ("val2014" if "2014" in annotation.name else "val2017")
    items, seen = [], {}
    for k, image in enumerate(data["images"]):
        where = f"{annotation}, images[{k}]"
        if not isinstance(image, dict):
            raise DatasetError(
                f"{where} must be an object with 'id' and 'file_name'; got {_describe(image)}."
            )
        image_id = _field(image, "id", where, kind="id")
        name = _relative_name(
            _field(image, "file_name", where, kind="text"), folder, where, "Image file_name"
        )
        item_id = f"coco-{image_id}"
        _unique(item_id, seen, where, f"image id {image_id!r}")
        items.append(
            DatasetItem(
                item_id=item_id,
                image_path=folder / name,
                instruction=instruction,
                meta={"captions": captions.get(image_id, [])},
            )
        )
    if not items:
        raise DatasetError(f"{annotation} lists no images.")
    items, skipped = _check_images(_sample(items, n, seed), skip_bad, max_pixels)
    return DatasetSample("coco", items, skipped, max_pixels, skip_bad)


# ---------------------------------------------------------------- Winoground
def _winoground_root(data_dir: Path) -> Path:
    """The folder holding the Winoground files: ``data_dir``, or the one snapshot of a hub cache's
    ``datasets--facebook--winoground`` folder (``data_dir`` itself, or under it)."""
    hub = data_dir / WINOGROUND_HUB_FOLDER
    hub = hub if hub.is_dir() else data_dir
    if not (hub / "snapshots").is_dir():
        return data_dir
    snapshots = sorted(p for p in (hub / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) == 1:
        return snapshots[0]
    ref = hub / "refs" / "main"
    main = f" (refs/main is {ref.read_text().strip()})" if ref.is_file() else ""
    listed = ", ".join(p.name for p in snapshots) or "none"
    raise DatasetError(
        f"{hub} is a Hugging Face hub cache folder with {len(snapshots)} snapshots: {listed}{main}. "
        "Pass --data-dir <that folder>/snapshots/<revision> for the one to use."
    )


def _winoground_files(data_dir: Path) -> tuple[Path, Path, str | None]:
    """(examples.jsonl, images folder or zip, member prefix in the zip or ``None`` for a folder)."""
    root = _winoground_root(data_dir)
    for base in (root, root / "data"):
        examples = base / "examples.jsonl"
        if not examples.is_file():
            continue
        if (base / "images").is_dir():
            return examples, base / "images", None
        archive = base / "images.zip"
        if archive.is_file():
            try:
                with zipfile.ZipFile(archive) as zf:
                    names = zf.namelist()
            except (zipfile.BadZipFile, OSError) as exc:
                raise DatasetError(
                    f"{archive} is not a readable zip archive ({exc}); re-download it."
                ) from exc
            prefix = "images/" if any(name.startswith("images/") for name in names) else ""
            return examples, archive, prefix
        raise DatasetError(
            f"Found {examples} but no images next to it: expected an images/ folder or images.zip in {base}."
        )
    raise DatasetError(
        f"No Winoground examples under {data_dir}: expected examples.jsonl and images/, or the dataset "
        "repository's data/examples.jsonl and data/images.zip (facebook/winoground on the Hugging Face "
        "hub; a hub cache snapshot folder works as --data-dir)."
    )


def _winoground_examples(examples_file: Path) -> list[dict]:
    """Every example, checked: a JSON object a line with a unique id, two image names and two captions."""
    examples, seen = [], {}
    for line_no, line in enumerate(_read_text(examples_file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{examples_file}:{line_no}"
        example = _parse_json(line, where)
        if not isinstance(example, dict):
            raise DatasetError(
                f"{where} must be a JSON object with id, image_0, image_1, caption_0 and caption_1; got "
                f"{_describe(example)}."
            )
        ex_id = _field(example, "id", where, kind="id")
        checked = {key: _field(example, key, where, kind="text") for key in ("image_0", "image_1")}
        checked |= {key: _field(example, key, where, kind="text") for key in ("caption_0", "caption_1")}
        _unique(str(ex_id), seen, where, f"example id {ex_id!r}")
        examples.append({**checked, "id": ex_id, "where": where})
    if not examples:
        raise DatasetError(f"{examples_file} holds no examples.")
    return examples


def load_winoground(
    data_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    template: str = WINOGROUND_TEMPLATE,
    skip_bad: bool = False,
    max_pixels: int | None = None,
) -> DatasetSample:
    """``n`` random Winoground examples, each as four items (image_i with caption_j)."""
    check_n(n)
    data_dir = Path(data_dir).absolute()
    examples_file, images, prefix = _winoground_files(data_dir)
    examples = _winoground_examples(examples_file)
    paths = {}
    for ex in examples:
        for key in ("image_0", "image_1"):
            name = _relative_name(ex[key], images, ex["where"], "Image")
            name = name if Path(name).suffix else f"{name}.png"
            paths[ex["id"], key] = images / name if prefix is None else zip_member_path(images, prefix + name)
    items = []
    for ex in _sample(examples, n, seed):
        for i in range(2):
            for j in range(2):
                items.append(
                    DatasetItem(
                        item_id=f"winoground-{ex['id']}-i{i}-c{j}",
                        image_path=paths[ex["id"], f"image_{i}"],
                        instruction=template.format(caption=ex[f"caption_{j}"]),
                        meta={"example": ex["id"], "image": i, "caption": j, "match": i == j},
                    )
                )
    items, skipped = _check_images(items, skip_bad, max_pixels)
    return DatasetSample("winoground", items, skipped, max_pixels, skip_bad)


# ---------------------------------------------------------------- bundled samples and dispatch
def load_samples(
    n: int | None = None,
    seed: int = 0,
    *,
    instruction: str = CAPTION_INSTRUCTION,
    max_pixels: int | None = None,
) -> DatasetSample:
    """The photographs shipped with the package (see ``runs/samples/LICENSES.md``)."""
    check_n(n)
    paths = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    items = [DatasetItem(f"sample-{p.stem}", p, instruction) for p in paths]
    return DatasetSample("samples", _sample(items, n, seed), max_pixels=max_pixels)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_folder(
    data_dir: str | Path,
    n: int | None = None,
    seed: int = 0,
    *,
    instruction: str = CAPTION_INSTRUCTION,
    skip_bad: bool = False,
    max_pixels: int | None = None,
) -> DatasetSample:
    """Every image file under ``data_dir`` (sorted, subfolders included) with one instruction; item ids
    are ``folder-<path relative to data_dir>``."""
    check_n(n)
    data_dir = Path(data_dir).absolute()
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder. Give the folder holding the images.")
    entries = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    not_files = [(str(p), _not_a_file(p)) for p in entries if not p.is_file()]
    if not_files and not skip_bad:
        path, reason = not_files[0]
        raise DatasetError(f"{reason} (pass --skip-bad to skip such entries and list them)")
    paths = [p for p in entries if p.is_file()]
    if not paths:
        raise DatasetError(f"No image files ({', '.join(IMAGE_SUFFIXES)}) under {data_dir}.")
    items = [DatasetItem(f"folder-{p.relative_to(data_dir).as_posix()}", p, instruction) for p in paths]
    items, skipped = _check_images(_sample(items, n, seed), skip_bad, max_pixels)
    return DatasetSample("folder", items, not_files + skipped, max_pixels, skip_bad)


def _not_a_file(path: Path) -> str:
    """Why the image-named entry ``path`` is no file to read."""
    if path.is_symlink() and not path.exists():
        what = f"a dangling symlink (to {os.readlink(path)}, which does not exist)"
    else:
        what = "not a regular file (a FIFO, socket or device)"
    return f"{path} is {what}; remove it from the folder or replace it with the image file"


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    n: int | None = None,
    seed: int = 0,
    *,
    skip_bad: bool = False,
    max_pixels: int | None = None,
) -> DatasetSample:
    """Dispatch on ``name``: ``coco``, ``winoground`` (read from ``data_dir``) or ``samples``."""
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset {name!r}; choose coco, winoground or samples.")
    check_n(n)
    if name == "samples":
        if data_dir is not None:
            raise DatasetError(
                f"The samples dataset ships with the package and reads no --data-dir (got {data_dir}). "
                "Leave --data-dir out, or choose --dataset coco or winoground to read files there."
            )
        return load_samples(n, seed, max_pixels=max_pixels)
    if data_dir is None:
        raise DatasetError(f"--data-dir is required for the {name!r} dataset.")
    loader = load_coco if name == "coco" else load_winoground
    return loader(data_dir, n, seed, skip_bad=skip_bad, max_pixels=max_pixels)
