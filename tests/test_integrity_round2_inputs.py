"""Issue 26, round 2: photos the right way up, dataset text that is text, bad items named and skipped."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image

from hooked_vllm.cli import main as cli_main
from hooked_vllm.errors import HookedVLMError
from hooked_vllm.model import HookedVLM
from hooked_vllm.model.images import load_image
from hooked_vllm.runs.datasets import (
    BadItemError,
    DatasetError,
    DatasetItem,
    DatasetSample,
    load_folder,
    load_winoground,
    screen_items,
)
from hooked_vllm.runs.phase_diagram import run_phase_diagram
from hooked_vllm.testing import tiny_llava, tiny_qwen2_vl
from tests.conftest import make_winoground

ORIENTATION = 0x0112


def _asymmetric(width: int = 6, height: int = 4) -> Image.Image:
    """A picture whose every rotation and flip differs: a red top-left corner on a gradient."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 1] = np.arange(width)[None, :] * 40
    pixels[..., 2] = np.arange(height)[:, None] * 60
    pixels[0, 0] = (255, 0, 0)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------- 5: EXIF orientation
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied_as_hf_does(tmp_path, orientation, suffix):
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"photo{suffix}"
    _asymmetric().save(path, exif=exif, **({"quality": 100, "subsampling": 0} if suffix == ".jpg" else {}))
    ours, hf = load_image(path), hf_load_image(str(path))
    assert ours.mode == "RGB" and ours.size == hf.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(hf))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_rotated_photo_ends_up_the_right_way_round(tmp_path, orientation):
    """A 6 x 4 picture stored rotated (as a phone does) with the tag that undoes the rotation."""
    upright = _asymmetric()
    stored = upright.rotate({3: 180, 6: 90, 8: 270}[orientation], expand=True)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    loaded = load_image(tmp_path / "phone.png")
    assert loaded.size == (6, 4)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))


# ---------------------------------------------------------------- 6: dataset text is text
@pytest.fixture(scope="module")
def vlms():
    return {"llava": HookedVLM.from_hf(*tiny_llava()), "qwen2_vl": HookedVLM.from_hf(*tiny_qwen2_vl())}


def _winoground(root, caption: str):
    """Two examples; example 1's caption_0 is ``caption`` (items winoground-1-i0-c0 and -i1-c0)."""
    make_winoground(root, n_examples=2)
    lines = [json.loads(line) for line in (root / "examples.jsonl").read_text().splitlines()]
    lines[1]["caption_0"] = caption
    (root / "examples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


BAD_IDS = ["winoground-1-i0-c0", "winoground-1-i1-c0"]


def _rows(result) -> dict[str, dict]:
    return {row["item_id"]: row for row in result.rows}


@pytest.mark.parametrize(
    "family, text",
    [
        ("llava", "the cat <image> is on the mat"),
        ("llava", "<image> and <image>"),
        ("qwen2_vl", "the cat <|image_pad|> is on the mat"),
        ("qwen2_vl", "a <|video_pad|> of a cat"),
        ("llava", "a cat \ud800 on a mat"),
        ("qwen2_vl", "a cat \ud800 on a mat"),
    ],
)
def test_bad_text_is_refused_or_skipped(tmp_path, vlms, family, text):
    vlm = vlms[family]
    root = _winoground(tmp_path / "wino", text)
    with pytest.raises(BadItemError) as info:
        run_phase_diagram(vlm, load_winoground(root), tmp_path / "strict", progress=False)
    message = str(info.value)
    assert "\n" not in message and BAD_IDS[0] in message and "--skip-bad" in message
    assert ("cannot be encoded" in message) if "\ud800" in text else ("image placeholder" in message)
    sample = load_winoground(root, skip_bad=True)
    result = run_phase_diagram(vlm, sample, tmp_path / "skip", progress=False, batch_size=3)
    assert [item_id for item_id, _ in sample.skipped] == BAD_IDS
    assert all(item_id in reason for item_id, reason in sample.skipped)
    every = [item.item_id for item in load_winoground(root).items]
    assert sorted(_rows(result)) == sorted(set(every) - set(BAD_IDS)) and len(every) == 8
    # the good items' results are those of a run over the good items alone
    good = load_winoground(root, skip_bad=True)
    good.items = [item for item in good.items if item.item_id not in BAD_IDS]
    alone = run_phase_diagram(vlm, good, tmp_path / "alone", progress=False, batch_size=3)
    assert _rows(result) == _rows(alone)


def test_placeholder_caption_through_both_commands(tmp_path, model_dir, capsys):
    root = _winoground(tmp_path / "wino", "the cat <image> is on the mat")
    common = ["--model", str(model_dir), "--dataset", "winoground", "--data-dir", str(root), "--no-progress"]
    for command, extra in (("phase-diagram", []), ("cache-activations", ["--hooks", "hook_embed"])):
        capsys.readouterr()
        assert cli_main([command, *common, *extra, "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and BAD_IDS[0] in err and "'<image>'" in err, err
        code = cli_main([command, *common, *extra, "--skip-bad", "--out", str(tmp_path / f"{command}-skip")])
        out = capsys.readouterr().out
        assert code == 0 and all(f"skipped {item_id}: Item {item_id}" in out for item_id in BAD_IDS), out
    assert "stored" in out and "of 6 items" in out


# ---------------------------------------------------------------- 8: bad items beyond loading
def _folder(root, sizes: dict[str, tuple[int, int]]):
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, (width, height) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / name)
    return root


def test_image_the_processor_refuses_is_named_and_skipped(tmp_path, vlms):
    """Qwen2-VL's processor refuses an aspect ratio over 200: that item alone is skipped, and the
    batch-mates' results are those of a run without it."""
    vlm = vlms["qwen2_vl"]
    root = _folder(tmp_path / "images", {"a.png": (40, 30), "b.png": (10000, 10), "c.png": (28, 56)})
    for workers in (0, 1):  # named in the main process: one line, also from a DataLoader worker
        with pytest.raises(BadItemError) as info:
            run_phase_diagram(
                vlm, load_folder(root), tmp_path / f"strict{workers}", progress=False, workers=workers
            )
        message = str(info.value)
        assert "\n" not in message and "folder-b.png" in message and "aspect ratio" in message
    sample = load_folder(root, skip_bad=True)
    result = run_phase_diagram(vlm, sample, tmp_path / "skip", progress=False, batch_size=4)
    assert [item_id for item_id, _ in sample.skipped] == ["folder-b.png"]
    assert "aspect ratio must be smaller than 200" in sample.skipped[0][1]
    assert result.aggregates["skipped"] == sample.skipped
    (root / "b.png").unlink()
    alone = run_phase_diagram(vlm, load_folder(root), tmp_path / "alone", progress=False, batch_size=4)
    assert sorted(_rows(result)) == ["folder-a.png", "folder-c.png"] and _rows(result) == _rows(alone)


def test_screen_with_the_processor_for_fixed_batches(tmp_path, vlms):
    """The activation store fixes its batches first: ``screen_items(..., processor=True)`` finds the
    items the processor refuses before any batch is made."""
    root = _folder(tmp_path / "images", {"a.png": (40, 30), "b.png": (10000, 10), "c.png": (28, 56)})
    with pytest.raises(BadItemError, match="folder-b.png.*aspect ratio"):
        screen_items(vlms["qwen2_vl"], load_folder(root), processor=True)
    sample = screen_items(vlms["qwen2_vl"], load_folder(root, skip_bad=True), processor=True)
    assert [item.item_id for item in sample.items] == ["folder-a.png", "folder-c.png"]
    assert [item_id for item_id, _ in sample.skipped] == ["folder-b.png"]
    with pytest.raises(
        BadItemError, match="Every item of the folder sample is bad; the first: Item folder-a"
    ):
        screen_items(vlms["llava"], load_folder(root, skip_bad=True, instruction="a \ud800"))


def test_folder_names_dangling_symlinks_and_fifos(tmp_path):
    root = _folder(tmp_path / "images", {"a.png": (20, 20), "c.png": (20, 20)})
    (root / "b.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "d.jpg")
    with pytest.raises(DatasetError) as info:
        load_folder(root)
    assert "\n" not in str(info.value) and "b.png is a dangling symlink" in str(info.value)
    (root / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"d\.jpg is not a regular file \(a FIFO"):
        load_folder(root)
    (root / "b.png").symlink_to(tmp_path / "gone.png")
    sample = load_folder(root, skip_bad=True)
    assert [item.item_id for item in sample.items] == ["folder-a.png", "folder-c.png"]
    assert [Path(path).name for path, _ in sample.skipped] == ["b.png", "d.jpg"]


def _markers_are_read_as_images_and_refused(vlm, tmp_path):
    """Every family: each marker is text the processor really reads as an image, a video or image
    structure (the prompt then fails, or has other image or structure positions than without it),
    and an item holding it is refused, naming the item and the marker."""
    picture = tmp_path / "picture.png"
    _asymmetric(40, 30).save(picture)
    markers = vlm.adapter.prompt_markers
    named = [getattr(vlm.adapter.processor, name, None) for name in ("image_token", "video_token")]
    assert {vlm.adapter.image_placeholder, *(str(token) for token in named if token)} <= set(markers)

    def layout(instruction: str) -> tuple[int, int, int]:
        """(image positions, instruction positions before the first of them, structure positions)."""
        batch = vlm.prepare([picture], [instruction])
        first = int(batch.image_mask[0].nonzero()[0, 0])
        special = batch.special_mask & batch.attention_mask.bool()
        return int(batch.image_mask.sum()), int(batch.text_mask[0, :first].sum()), int(special.sum())

    plain = layout("a cat")
    for marker in markers:
        try:
            moved = layout(f"a {marker} cat") != plain
        except (ValueError, TypeError, HookedVLMError):
            moved = True
        assert moved, marker
        sample = DatasetSample("items", [DatasetItem("item-7", picture, f"a {marker} cat")])
        with pytest.raises(BadItemError) as info:
            screen_items(vlm, sample)
        assert "item-7" in str(info.value) and repr(marker) in str(info.value)


def test_markers_of_every_family(family, tmp_path):
    _markers_are_read_as_images_and_refused(family.vlm, tmp_path)


def test_markers_of_every_new_family(new_family, tmp_path):
    _markers_are_read_as_images_and_refused(new_family.vlm, tmp_path)


def test_activation_store_names_an_item_it_cannot_prepare(tmp_path, vlms):
    """The store's batches are fixed before it starts: an item that cannot be prepared (here a text
    longer than the model's context) is a one-line error naming it, or screened out first."""
    from hooked_vllm.activations.store import ActivationStore

    vlm = vlms["llava"]
    root = _folder(tmp_path / "images", {"a.png": (40, 30), "b.png": (30, 40), "c.png": (28, 56)})
    long = "word " * vlm.n_ctx

    def sample(**kwargs):
        folder = load_folder(root, **kwargs)
        folder.items = [
            replace(i, instruction=long) if i.item_id == "folder-b.png" else i for i in folder.items
        ]
        return folder

    with pytest.raises(BadItemError) as info:
        ActivationStore.write(vlm, sample(), tmp_path / "strict", hooks=["hook_embed"], progress=False)
    assert "\n" not in str(info.value) and "folder-b.png" in str(info.value) and "context" in str(info.value)
    with pytest.raises(BadItemError, match="folder-b.png.*context"):
        screen_items(vlm, sample(), processor=True)
    screened = screen_items(vlm, sample(skip_bad=True), processor=True)
    assert [item_id for item_id, _ in screened.skipped] == ["folder-b.png"]
    store = ActivationStore.write(vlm, screened, tmp_path / "skip", hooks=["hook_embed"], progress=False)
    assert sorted(set(store.item_ids)) == ["folder-a.png", "folder-c.png"]


def test_activation_store_write_skips_bad_items_itself_under_skip_bad(tmp_path, vlms):
    """The library call screens as the CLI run does: a sample loaded with skip_bad loses its bad item
    (listed in skipped) and the store holds the others, equal to a store of the good items alone."""
    from hooked_vllm.activations.store import ActivationStore

    vlm = vlms["llava"]
    root = _folder(tmp_path / "images", {"a.png": (40, 30), "b.png": (30, 40), "c.png": (28, 56)})
    sample = load_folder(root, skip_bad=True)
    sample.items = [
        replace(i, instruction="word " * vlm.n_ctx) if i.item_id == "folder-b.png" else i
        for i in sample.items
    ]
    store = ActivationStore.write(vlm, sample, tmp_path / "skip", hooks=["hook_embed"], progress=False)
    assert [item_id for item_id, _ in sample.skipped] == ["folder-b.png"]
    assert sorted(set(store.item_ids)) == ["folder-a.png", "folder-c.png"]
    good = load_folder(root)
    good.items = [i for i in good.items if i.item_id != "folder-b.png"]
    alone = ActivationStore.write(vlm, good, tmp_path / "good", hooks=["hook_embed"], progress=False)
    assert len(store) == len(alone)
    for row in range(len(store)):
        assert (store[row]["hook_embed"] == alone[row]["hook_embed"]).all()


def test_items_another_rank_skipped_are_listed_by_rank_0(model_dir, tmp_path, monkeypatch):
    """Under torchrun each rank prepares its own items: the ones its processor refuses are listed in
    rank 0's aggregates too, not only on the rank that met them."""
    vlm = HookedVLM.from_pretrained(str(model_dir))
    prepare = vlm.prepare

    def refusing(images, texts, *args, **kwargs):  # the processor refusing one item's text
        if any("refuse me" in text for text in texts):
            raise ValueError("the processor refuses this item")
        return prepare(images, texts, *args, **kwargs)

    monkeypatch.setattr(vlm, "prepare", refusing)
    images = tmp_path / "images"
    images.mkdir()
    items = []
    for i in range(4):
        Image.new("RGB", (24 + 8 * i, 24), (60 * i, 90, 30)).save(images / f"{i}.png")
        text = "refuse me" if i == 3 else "What is this?"
        items.append(DatasetItem(f"item-{i}", images / f"{i}.png", text))
    for rank in (0, 1, 0):  # rank 1 meets item-3 (items[1::2]); rank 0 aggregates once it is done
        sample = DatasetSample("two ranks", list(items), skip_bad=True)
        result = run_phase_diagram(
            vlm, sample, tmp_path / "run", batch_size=2, rank=rank, world_size=2, progress=False
        )
    assert [item_id for item_id, _ in result.aggregates["skipped"]] == ["item-3"]
    assert "the processor refuses this item" in result.aggregates["skipped"][0][1]
    assert result.aggregates["n_items"] == 3
