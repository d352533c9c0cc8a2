"""Dataset readers: malformed annotation files give DatasetError (never a traceback), paths stay inside
their folder lexically while symlinks placed there are followed, and Winoground reads from the hub's
file layout."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from hooked_vllm.errors import HookedVLMError, ImageLoadError
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.datasets import (
    DatasetError,
    load_coco,
    load_dataset,
    load_samples,
    load_winoground,
)
from hooked_vllm.runs.shapes_dataset import load_shapes


# ---------------------------------------------------------------- fixture files
def picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (6, 7, 3), dtype=np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def coco_annotations(n: int = 3) -> dict:
    return {
        "images": [{"id": 100 + i, "file_name": f"COCO_val2014_{i:012d}.png"} for i in range(n)],
        "annotations": [{"id": i, "image_id": 100 + i, "caption": f"picture {i}"} for i in range(n)],
    }


def write_coco(root: Path, data=None, *, images: Path | None = None, n: int = 3) -> Path:
    """COCO files under ``root``; the images go to ``images`` (default ``root/val2014``)."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    folder = images or root / "val2014"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"COCO_val2014_{i:012d}.png").write_bytes(png_bytes(picture(i)))
    text = (
        data if isinstance(data, (bytes, str)) else json.dumps(coco_annotations(n) if data is None else data)
    )
    path = root / "annotations" / "captions_val2014.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def winoground_examples(n: int = 2) -> list[dict]:
    return [
        {
            "id": i,
            "image_0": f"ex_{i}_img_0",
            "image_1": f"ex_{i}_img_1",
            "caption_0": "the cat is on the mat",
            "caption_1": "the mat is on the cat",
            "tag": "Object",
        }
        for i in range(n)
    ]


def winoground_images(n: int = 2) -> dict[str, np.ndarray]:
    return {f"ex_{i}_img_{j}.png": picture(10 * i + j) for i in range(n) for j in range(2)}


def jsonl(examples) -> str:
    return "".join(json.dumps(example) + "\n" for example in examples)


def write_winoground(root: Path, lines: str | bytes | None = None, *, images: Path | None = None) -> Path:
    folder = images or root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in winoground_images().items():
        (folder / name).write_bytes(png_bytes(pixels))
    text = jsonl(winoground_examples()) if lines is None else lines
    (root / "examples.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def pixels_of(item) -> np.ndarray:
    return np.asarray(load_image(item.image_path))


# ---------------------------------------------------------------- malformed files (property tests)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated(draw, document):
    """``document`` with a few random edits: fields replaced by random JSON values (or removed),
    entries replaced by lists or nulls, entries duplicated."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        containers = [document]
        stack = [document]
        while stack:
            node = stack.pop()
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
            for child in children:
                if isinstance(child, (dict, list)):
                    containers.append(child)
                    stack.append(child)
        node = draw(st.sampled_from(containers))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            continue
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["replace", "delete", "listify", "null", "duplicate"]))
        if action == "replace":
            node[key] = draw(json_values)
        elif action == "listify":
            node[key] = [node[key]]
        elif action == "null":
            node[key] = None
        elif action == "delete":
            del node[key]
        elif isinstance(node, list):
            node.append(copy.deepcopy(node[key]))
    return document


@st.composite
def damaged_bytes(draw, text: str) -> bytes:
    """``text`` as bytes, possibly truncated or with bytes that are not UTF-8."""
    data = text.encode()
    action = draw(st.sampled_from(["keep", "keep", "keep", "keep", "truncate", "non-utf8"]))
    if action == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif action == "non-utf8":
        at = draw(st.integers(0, len(data)))
        data = (
            data[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80\x80", b"\xed\xa0\x80"]))
            + data[at:]
        )
    return data


def check_outcome(load, folder_text: str) -> None:
    """``load()`` returns a sample of unique ids and paths under the folder, or raises our errors."""
    try:
        sample = load()
    except HookedVLMError as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("read")
    ids = [item.item_id for item in sample.items]
    assert len(ids) == len(set(ids))
    assert all(str(item.image_path).startswith(folder_text) for item in sample.items)
    assert all(".." not in Path(str(item.image_path)).parts for item in sample.items)


# A third example, reusing the images of the first two, to be damaged.
EXTRA_EXAMPLE = {**winoground_examples()[0], "id": 2, "image_1": "ex_1_img_1"}


@settings(max_examples=300, deadline=None)
@given(
    document=st.one_of(mutated(coco_annotations()), mutated(coco_annotations()), json_values),
    damage=st.data(),
    n=st.sampled_from([None, None, 1, 2, 4, 0, -1]),
)
def test_malformed_coco_files_raise_only_our_errors(tmp_path_factory, document, damage, n):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, damage.draw(damaged_bytes(json.dumps(document))))
    check_outcome(lambda: load_coco(root, n=n), str(root / "val2014"))


@settings(max_examples=300, deadline=None)
@given(
    examples=st.lists(st.one_of(mutated(EXTRA_EXAMPLE), mutated(EXTRA_EXAMPLE), json_values), max_size=2),
    damage=st.data(),
    n=st.sampled_from([None, None, 1, 2, 4, 0, -1]),
)
def test_malformed_winoground_files_raise_only_our_errors(tmp_path_factory, examples, damage, n):
    root = tmp_path_factory.mktemp("wino")
    write_winoground(root, damage.draw(damaged_bytes(jsonl(winoground_examples() + examples))))
    check_outcome(lambda: load_winoground(root, n=n), str(root / "images"))


# ---------------------------------------------------------------- wrong types, nulls, duplicates
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(images={"0": d["images"][0]}), r"'images' is a list"),
        (lambda d: d.update(images=["a.png", "b.png"]), r"images\[0\] must be an object.*str 'a.png'"),
        (
            lambda d: d["images"][1].update(id=None),
            r"images\[1\]: 'id' must be an integer or a non-empty string",
        ),
        (lambda d: d["images"][1].update(id=True), r"'id' must be an integer"),
        (
            lambda d: d["images"][0].update(file_name=7),
            r"images\[0\]: 'file_name' must be a non-empty string",
        ),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] lacks the field 'file_name'"),
        (
            lambda d: d["annotations"][2].update(caption=None),
            r"annotations\[2\]: 'caption' must be a non-empty",
        ),
        (lambda d: d.update(annotations={"a": 1}), r"'annotations' must be a list"),
        (lambda d: d["images"][2].update(id=100), r"images\[2\]: image id 100 is also used by .*images\[0\]"),
        (lambda d: d["images"][2].update(id="100"), r"image id '100' is also used by"),
    ],
)
def test_coco_fields_are_checked(tmp_path, edit, message):
    data = coco_annotations()
    edit(data)
    root = write_coco(tmp_path / "coco", data)
    with pytest.raises(DatasetError, match=message) as caught:
        load_coco(root)
    assert "captions_val2014.json" in str(caught.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('[1, "ex_0_img_0"]', r"examples.jsonl:3 must be a JSON object.*list"),
        ("null", r"examples.jsonl:3 must be a JSON object"),
        ('"text"', r"examples.jsonl:3 must be a JSON object"),
    ],
)
def test_winoground_lines_that_are_not_objects_are_refused(tmp_path, line, message):
    root = write_winoground(tmp_path / "wino", jsonl(winoground_examples()) + line + "\n")
    with pytest.raises(DatasetError, match=message):
        load_winoground(root)


@pytest.mark.parametrize("value", [None, "", "   ", 3, ["a"]])
def test_winoground_captions_must_be_non_empty_strings(tmp_path, value):
    examples = winoground_examples()
    examples[1]["caption_1"] = value
    root = write_winoground(tmp_path / "wino", jsonl(examples))
    with pytest.raises(DatasetError, match=r"examples.jsonl:2: 'caption_1' must be a non-empty string"):
        load_winoground(root)


def test_winoground_null_caption_never_becomes_the_prompt_none(tmp_path):
    examples = winoground_examples()
    examples[0]["caption_0"] = None
    root = write_winoground(tmp_path / "wino", jsonl(examples))
    with pytest.raises(DatasetError, match="caption_0"):
        load_winoground(root, n=1, seed=0)


@pytest.mark.parametrize("duplicate", [0, "0"])
def test_duplicate_winoground_ids_are_refused_at_load_time(tmp_path, duplicate):
    examples = winoground_examples(3)
    examples[2]["id"] = duplicate
    root = write_winoground(tmp_path / "wino", jsonl(examples))
    with pytest.raises(
        DatasetError, match=r"examples.jsonl:3: example id .*0.* is also used by .*examples.jsonl:1"
    ):
        load_winoground(root, n=1)


def test_unreadable_annotation_files(tmp_path):
    text = json.dumps(coco_annotations())
    with pytest.raises(DatasetError, match="not valid JSON.*truncated"):
        load_coco(write_coco(tmp_path / "truncated", text[: len(text) // 2]))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_coco(write_coco(tmp_path / "latin1", text.replace("picture 1", "caf\xe9").encode("latin-1")))
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_winoground(write_winoground(tmp_path / "wino", b'{"id": 0, "caption_0": "\xff"}\n'))
    with pytest.raises(DatasetError, match=r"examples.jsonl:2 is not valid JSON"):
        load_winoground(write_winoground(tmp_path / "wino2", jsonl(winoground_examples())[:-30] + "\n"))


# ---------------------------------------------------------------- paths: lexical rule, symlinks
def test_image_folders_reached_through_symlinks_are_read(tmp_path):
    elsewhere = tmp_path / "data" / "coco"
    root = tmp_path / "coco"
    root.mkdir()
    (root / "val2014").symlink_to(elsewhere, target_is_directory=True)
    elsewhere.mkdir(parents=True)
    write_coco(root)
    sample = load_coco(root)
    assert [item.item_id for item in sample.items] == ["coco-100", "coco-101", "coco-102"]
    assert all(np.array_equal(pixels_of(item), picture(i)) for i, item in enumerate(sample.items))
    assert all(str(item.image_path).startswith(str(root.absolute() / "val2014")) for item in sample.items)

    wino_images = tmp_path / "data" / "winoground-images"
    wino = tmp_path / "wino"
    wino.mkdir()
    wino_images.mkdir(parents=True)
    (wino / "images").symlink_to(wino_images, target_is_directory=True)
    write_winoground(wino)
    items = load_winoground(wino).items
    assert len(items) == 8
    assert items[5].item_id == "winoground-1-i0-c1"
    assert np.array_equal(pixels_of(items[5]), picture(10))


def test_a_symlinked_data_dir_and_symlinked_files_are_read(tmp_path):
    real = write_coco(tmp_path / "real")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (real / "val2014" / "alias.png").symlink_to(real / "val2014" / "COCO_val2014_000000000001.png")
    data = coco_annotations()
    data["images"][0]["file_name"] = "alias.png"
    (real / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    sample = load_coco(tmp_path / "link")
    assert np.array_equal(pixels_of(sample.items[0]), picture(1))


@pytest.mark.parametrize(
    "name",
    ["../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "..", "C:\\x.jpg", "..\\x.jpg", "c:x.jpg", "a\x00.jpg"],
)
def test_names_escaping_the_folder_lexically_are_refused(tmp_path, name):
    outside = tmp_path / "x.jpg"
    outside.write_bytes(png_bytes(picture(0)))
    data = coco_annotations()
    data["images"][1]["file_name"] = name
    with pytest.raises(DatasetError, match=r"images\[1\]: Image file_name .* points outside the data folder"):
        load_coco(write_coco(tmp_path / "coco", data))
    examples = winoground_examples()
    examples[1]["image_0"] = name
    with pytest.raises(DatasetError, match=r"examples.jsonl:2: Image .* points outside the data folder"):
        load_winoground(write_winoground(tmp_path / "wino", jsonl(examples)))


# ---------------------------------------------------------------- Winoground as the hub ships it
def make_hub_cache(hub_root: Path, revisions=("3b8f2e4c",), *, extracted: bool = False) -> Path:
    """A fake ``datasets--facebook--winoground`` cache folder: files in ``blobs/<sha256>``, each
    snapshot's ``data/examples.jsonl`` and ``data/images.zip`` symlinks into them (as the hub does)."""
    repo = hub_root / "datasets--facebook--winoground"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revisions[-1])
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for name, pixels in winoground_images().items():
            zf.writestr(f"images/{name}", png_bytes(pixels))
    blobs = {
        "data/examples.jsonl": jsonl(winoground_examples()).encode(),
        "data/images.zip": archive.getvalue(),
    }
    for revision in revisions:
        snapshot = repo / "snapshots" / revision
        (snapshot / "data").mkdir(parents=True)
        for relative, content in blobs.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            (snapshot / relative).symlink_to(os.path.relpath(blob, (snapshot / relative).parent))
        (snapshot / "README.md").write_text("---\npretty_name: Winoground\n---\n")
    return repo


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_winoground_reads_the_hub_cache_layout_without_extracting(tmp_path):
    repo = make_hub_cache(tmp_path / "hub")
    snapshot = repo / "snapshots" / "3b8f2e4c"
    assert (snapshot / "data" / "images.zip").is_symlink()
    before = all_files(tmp_path)
    expected = winoground_images()
    for data_dir in (snapshot, repo, tmp_path / "hub"):
        sample = load_winoground(data_dir, max_pixels=1000)
        assert sample.max_pixels == 1000 and not sample.skipped
        assert len(sample.items) == 8
        for item in sample.items:
            ex, i = item.meta["example"], item.meta["image"]
            assert str(item.image_path).endswith(f"images.zip::images/ex_{ex}_img_{i}.png")
            assert np.array_equal(pixels_of(item), expected[f"ex_{ex}_img_{i}.png"])
    assert all_files(tmp_path) == before


def test_winoground_hub_cache_with_several_snapshots_is_refused_with_the_list(tmp_path):
    repo = make_hub_cache(tmp_path / "hub", revisions=("aaaa1111", "bbbb2222"))
    with pytest.raises(
        DatasetError, match=r"2 snapshots: aaaa1111, bbbb2222 \(refs/main is bbbb2222\).*snapshots/"
    ):
        load_winoground(repo)
    assert len(load_winoground(repo / "snapshots" / "aaaa1111").items) == 8


def test_winoground_data_folder_with_extracted_images_and_a_top_level_zip(tmp_path):
    extracted = tmp_path / "extracted"
    write_winoground(extracted / "data")
    assert np.array_equal(pixels_of(load_winoground(extracted).items[0]), picture(0))
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "examples.jsonl").write_text(jsonl(winoground_examples()))
    with zipfile.ZipFile(flat / "images.zip", "w") as zf:  # members at the top of the archive
        for name, pixels in winoground_images().items():
            zf.writestr(name, png_bytes(pixels))
    items = load_winoground(flat).items
    assert str(items[0].image_path).endswith("images.zip::ex_0_img_0.png")
    assert np.array_equal(pixels_of(items[-1]), picture(11))


def test_a_corrupt_zip_and_missing_members(tmp_path):
    root = tmp_path / "wino"
    root.mkdir()
    (root / "examples.jsonl").write_text(jsonl(winoground_examples()))
    (root / "images.zip").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a readable zip archive"):
        load_winoground(root)
    with zipfile.ZipFile(root / "images.zip", "w") as zf:
        zf.writestr("images/ex_0_img_0.png", png_bytes(picture(0)))
    with pytest.raises(ImageLoadError, match="not found in the archive.*skip-bad"):
        load_winoground(root)
    sample = load_winoground(root, skip_bad=True)
    assert [item.item_id for item in sample.items] == [f"winoground-0-i0-c{j}" for j in range(2)]
    assert len(sample.skipped) == 3


# ---------------------------------------------------------------- arguments
def test_data_dir_is_refused_for_the_samples_dataset(tmp_path):
    with pytest.raises(DatasetError, match="reads no --data-dir.*Leave --data-dir out"):
        load_dataset("samples", data_dir=tmp_path)
    assert len(load_dataset("samples", n=2).items) == 2


@pytest.mark.parametrize("n", [0, -3, True, 2.0])
def test_n_must_be_at_least_1(tmp_path, n):
    for load in (
        lambda: load_dataset("samples", n=n),
        lambda: load_samples(n=n),
        lambda: load_coco(write_coco(tmp_path / "coco"), n=n),
        lambda: load_winoground(write_winoground(tmp_path / "wino"), n=n),
        lambda: load_dataset("coco", tmp_path / "coco", n=n),
        lambda: load_shapes(tmp_path / "shapes", n=n),
    ):
        with pytest.raises(DatasetError, match="--n must be at least 1"):
            load()


def png_claiming(width: int, height: int) -> bytes:
    data = bytearray(png_bytes(picture(0)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_max_pixels_reaches_the_image_checks_and_the_sample(tmp_path):
    root = write_coco(tmp_path / "coco")
    (root / "val2014" / "COCO_val2014_000000000001.png").write_bytes(png_claiming(20000, 20000))
    with pytest.raises(ImageLoadError, match="20000 x 20000.*skip-bad"):
        load_coco(root)
    sample = load_dataset("coco", root, skip_bad=True)
    assert [item.item_id for item in sample.items] == ["coco-100", "coco-102"]
    assert "20000 x 20000" in sample.skipped[0][1] and sample.max_pixels is None
    sample = load_coco(root, skip_bad=True, max_pixels=41)  # 7 x 6 = 42 pixels each
    assert sample.items == [] and len(sample.skipped) == 3 and sample.max_pixels == 41
    assert load_coco(root, n=1, seed=0, max_pixels=42).max_pixels == 42
    assert load_samples(n=1, max_pixels=5).max_pixels == 5
