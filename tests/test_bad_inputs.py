"""Bad input gets an error naming the problem and the fix; odd image formats are converted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_vllm import (
    BatchFormatError,
    ImageCountError,
    ImageLoadError,
    MissingImageError,
    SequenceTooLongError,
)
from hooked_vllm.model.images import load_image, to_rgb
from tests.conftest import INSTRUCTIONS, random_images


def test_more_or_fewer_images_than_placeholders(llava):
    vlm = llava.vlm
    images = random_images(2)
    with pytest.raises(ImageCountError, match="one entry per prompt"):
        vlm.prepare(images, INSTRUCTIONS[:1])
    with pytest.raises(ImageCountError, match="2 image placeholder"):
        vlm.prepare([images[0]], ["USER: <image>\n<image>\nCompare. ASSISTANT:"], apply_template=False)
    with pytest.raises(ImageCountError, match="1 image placeholder"):
        vlm.prepare([images], ["USER: <image>\nDescribe. ASSISTANT:"], apply_template=False)


def test_images_and_placeholders_out_of_step_in_a_raw_batch(llava):
    vlm = llava.vlm
    batch = vlm.prepare(random_images(2), INSTRUCTIONS[:2])
    raw = dict(batch.inputs)
    raw["pixel_values"] = raw["pixel_values"][:1]
    with pytest.raises(ImageCountError, match="placeholder"):
        vlm(raw)


def test_missing_pixel_values_or_missing_placeholders(family):
    vlm = family.vlm
    batch = vlm.prepare(random_images(1), INSTRUCTIONS[:1])
    no_pixels = {k: v for k, v in batch.inputs.items() if k != "pixel_values"}
    with pytest.raises(MissingImageError, match="no 'pixel_values'"):
        vlm(no_pixels)
    no_placeholders = dict(batch.inputs)
    keep = batch.input_ids[0] != vlm.adapter.image_token_id
    no_placeholders["input_ids"] = batch.input_ids[:, keep]
    no_placeholders["attention_mask"] = batch.attention_mask[:, keep]
    with pytest.raises(MissingImageError, match="silently ignored"):
        vlm(no_placeholders)


def test_batch_without_input_ids(llava):
    with pytest.raises(BatchFormatError, match="input_ids"):
        llava.vlm({"pixel_values": torch.zeros(1, 3, 30, 30)})


def test_sequence_longer_than_the_context(llava):
    vlm = llava.vlm
    long_prompt = " ".join(["describe"] * 600)
    with pytest.raises(SequenceTooLongError, match="context is 512"):
        vlm.prepare(random_images(1), [long_prompt])
    batch = vlm.prepare(random_images(1), INSTRUCTIONS[:1])
    with pytest.raises(SequenceTooLongError, match="max_new_tokens"):
        vlm.generate(batch, max_new_tokens=1000)


def test_image_modes_are_converted():
    grey = Image.new("L", (4, 4), 77)
    assert to_rgb(grey).getpixel((0, 0)) == (77, 77, 77)
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.full((4, 4), 257 * 200, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert to_rgb(sixteen).getpixel((0, 0)) == (200, 200, 200)
    floats = np.full((5, 6, 3), 0.5, dtype=np.float32)  # (4, 4, 3) would be ambiguous
    assert to_rgb(floats).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ImageLoadError, match="shape"):
        to_rgb(np.zeros((5, 6, 7)))


def test_converted_images_run_like_their_rgb_versions(llava):
    vlm = llava.vlm
    grey = Image.fromarray((np.arange(900).reshape(30, 30) % 256).astype("uint8"), mode="L")
    as_rgb = grey.convert("RGB")
    assert torch.equal(vlm(vlm.prepare([grey], ["Describe."])), vlm(vlm.prepare([as_rgb], ["Describe."])))


def test_corrupt_and_missing_image_files(llava, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(corrupt)
    with pytest.raises(ImageLoadError, match="corrupt"):
        llava.vlm.prepare([str(corrupt)], ["Describe."])
    with pytest.raises(ImageLoadError, match="not found"):
        llava.vlm.prepare([str(tmp_path / "missing.png")], ["Describe."])
    good = tmp_path / "good.png"
    random_images(1)[0].save(good)
    assert llava.vlm.prepare([str(good)], ["Describe."]).pixel_values is not None
