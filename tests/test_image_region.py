"""Figures lay tile 0's patch grid over the part of the image the model saw: the centre square of a
non-square image for LLaVA-1.5 (CLIP's centre crop), the whole image where the processor resizes it
onto the grid. Checked against the processor's own pixels: a horizontal and a vertical gradient
tell which original columns and rows reach the first and last pixel of the base view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import Family

WIDTH, HEIGHT = 96, 24


def gradient_image() -> Image.Image:
    """Red: the column (0 at the left edge's centre, 255 at the right's), green: the row."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, WIDTH).round().astype(np.uint8)[None, :]
    pixels[..., 1] = np.linspace(0, 255, HEIGHT).round().astype(np.uint8)[:, None]
    return Image.fromarray(pixels)


@pytest.mark.parametrize("name", ["llava", "llava_next", "llava_onevision", "gemma3", "paligemma"])
def test_the_region_is_what_the_base_view_holds(name, tmp_path):
    vlm = Family(name, tmp_path).vlm
    batch = vlm.prepare([gradient_image()], ["Describe the image."])
    pixels = batch.inputs["pixel_values"]
    base = pixels.reshape(-1, *pixels.shape[-3:])[0]  # tile 0: the first view in these families
    processor = vlm.adapter.processor.image_processor
    mean, std = (
        torch.tensor(v, dtype=torch.float32)[:, None, None]
        for v in (processor.image_mean, processor.image_std)
    )
    seen = (base.float() * std + mean) * 255
    columns = seen[0].mean(0) / 255 * (WIDTH - 1)  # original column at each pixel of the view
    rows = seen[1].mean(1) / 255 * (HEIGHT - 1)
    left, top, right, bottom = vlm.adapter.image_region((WIDTH, HEIGHT))
    # a view pixel's centre lies half a pixel in from the region's edge; resampling blurs by one more
    tol_x = (right - left) / base.shape[-1] + 1
    tol_y = (bottom - top) / base.shape[-2] + 1
    assert float(columns[0]) == pytest.approx(left, abs=tol_x)
    assert float(columns[-1]) == pytest.approx(right - 1, abs=tol_x)
    assert float(rows[0]) == pytest.approx(top, abs=tol_y)
    assert float(rows[-1]) == pytest.approx(bottom - 1, abs=tol_y)
    if name == "llava":  # the centre crop: a quarter of this 4:1 image's width
        assert (left, right) == pytest.approx((36, 60))
