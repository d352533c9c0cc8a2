"""Issue 26, round 2: photos the right way up, dataset text that is text, bad items named and skipped."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.image_utils import load_image as hf_load_image

from hooked_vllm.model.images import load_image

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
