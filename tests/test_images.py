"""Image conversion: one rule for arrays, tensors and PIL modes (refuse or convert exactly), and the
pixel limit of image files."""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from hooked_vllm.errors import HookedVLMError, ImageLoadError
from hooked_vllm.model import images
from hooked_vllm.model.images import load_image, to_rgb, zip_member_path

CHANNELS = (1, 3, 4)
FLOATS = ("float16", "float32", "float64", "bfloat16")
INTEGERS = ("int8", "int16", "int32", "int64", "uint16", "uint32")
TORCH_DTYPES = {
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
}


def as_rgb(reference: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 image a grey (H, W) or colour (H, W, 3) reference stands for."""
    return np.repeat(reference[..., None], 3, axis=-1) if reference.ndim == 2 else reference


def encode(values: np.ndarray, dtype: str, container: str):
    """``values`` (float64) stored as ``dtype`` in a numpy array or a torch tensor."""
    if dtype in INTEGERS:
        values = values.astype(np.int64)  # then wrapped, as a cast of such data would
    if container == "torch":
        return torch.from_numpy(values).to(TORCH_DTYPES[dtype])
    return values.astype(dtype)


@st.composite
def array_cases(draw):
    """(input, reference RGB image or None where the rule says the input must be refused)."""
    container = draw(st.sampled_from(["numpy", "torch"]))
    readable = ["uint8", "bool", "float16", "float32", "float64"] + (
        ["bfloat16"] if container == "torch" else []
    )
    dtype = draw(st.sampled_from(readable + readable + list(INTEGERS)))  # converted more often than not
    layout = draw(st.sampled_from(["HW", "HW1", "1HW", "HWC", "CHW", "HWA", "AHW"]))
    sizes = st.integers(0, 9) | st.integers(5, 9)  # 0 (empty) and 1, 3, 4 (ambiguous) less often
    height, width = draw(sizes), draw(sizes)
    grey = layout in ("HW", "HW1", "1HW")
    shape = (height, width) if grey else (height, width, 3)
    levels = st.sampled_from([0, 255]) if dtype == "bool" else st.integers(0, 255)
    reference = draw(arrays(np.uint8, shape, elements=levels))
    scales = ["unit", "unit", "unit", "0-255", "negative", "nan", "inf"]
    scale = draw(st.sampled_from(scales)) if dtype in FLOATS else "int"

    if scale == "unit":
        values, opaque = reference / 255.0, 1.0
    elif scale == "negative":
        values, opaque = -(reference / 255.0), -1.0
    else:
        values, opaque = reference.astype(np.float64), 255.0
    if scale in ("nan", "inf") and values.size:
        values.flat[draw(st.integers(0, values.size - 1))] = np.nan if scale == "nan" else -np.inf
    if dtype == "bool":
        values, opaque = reference > 0, True

    if layout in ("HW1", "1HW"):
        values = values[..., None]
    if layout in ("HWA", "AHW"):
        values = np.concatenate([values, np.full((height, width, 1), opaque, dtype=values.dtype)], axis=-1)
    if layout in ("1HW", "CHW", "AHW"):
        values = np.moveaxis(values, -1, 0)
    image = encode(np.ascontiguousarray(values), dtype, container)

    # The rule, read off the stored input (not off the reference).
    stored = np.asarray(values, dtype=np.float64)
    ambiguous = stored.ndim == 3 and stored.shape[0] in CHANNELS and stored.shape[-1] in CHANNELS
    refuse = stored.size == 0 or ambiguous or dtype in INTEGERS
    if dtype in FLOATS:
        refuse |= not np.isfinite(stored).all() or bool(
            stored.size and (stored.min() < 0 or stored.max() > 1)
        )
    expected = as_rgb(reference)
    if scale == "0-255":
        expected = expected * np.uint8(255)  # accepted only where every value is 0 or 1
    return image, None if refuse else expected


@st.composite
def pil_cases(draw):
    """(PIL image, reference RGB image or None where the rule says it must be refused)."""
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "I;16", "1", "F", "F-0-255", "I"]))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    colour = mode in ("RGB", "RGBA", "P")
    shape = (height, width, 3) if colour else (height, width)
    levels = st.sampled_from([0, 255]) if mode == "1" else st.integers(0, 255)
    reference = draw(arrays(np.uint8, shape, elements=levels))
    expected = as_rgb(reference)
    if mode in ("L", "RGB"):
        image = Image.fromarray(reference)
    elif mode == "RGBA":
        image = Image.fromarray(np.concatenate([reference, np.full((height, width, 1), 255, np.uint8)], -1))
    elif mode == "P":
        colours, index = np.unique(reference.reshape(-1, 3), axis=0, return_inverse=True)
        image = Image.frombytes("P", (width, height), index.reshape(-1).astype(np.uint8).tobytes())
        image.putpalette(colours.astype(np.uint8).tobytes())
    elif mode == "I;16":  # 257 * v, off by at most 128 either way, is v
        offsets = draw(arrays(np.int64, shape, elements=st.integers(-128, 128)))
        image = Image.fromarray(
            np.clip(reference.astype(np.int64) * 257 + offsets, 0, 65535).astype(np.uint16)
        )
    elif mode == "1":
        image = Image.fromarray(reference > 0)
    elif mode == "F":
        image = Image.fromarray((reference / 255.0).astype(np.float32))
    elif mode == "F-0-255":
        image = Image.fromarray(reference.astype(np.float32))
        expected = None if reference.max() > 1 else expected * np.uint8(255)
    else:  # 32-bit integers made in memory: their scale is unknown
        image, expected = Image.fromarray(reference.astype(np.int32)), None
    assert image.mode == mode.split("-")[0]
    return image, expected


def check_conversion(image, expected) -> None:
    try:
        result = to_rgb(image)
    except ImageLoadError as exc:
        event("refused")
        assert expected is None, f"refused an input the rule accepts: {exc}"
        assert str(exc)
        return
    event("converted")
    assert expected is not None, "accepted an input the rule refuses"
    assert result.mode == "RGB"
    assert np.array_equal(np.asarray(result), expected)


@settings(max_examples=400, deadline=None)
@given(array_cases())
def test_arrays_and_tensors_are_converted_exactly_or_refused(case):
    check_conversion(*case)


@settings(max_examples=150, deadline=None)
@given(pil_cases())
def test_pil_modes_are_converted_exactly_or_refused(case):
    check_conversion(*case)


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=3), st.lists(st.integers(), max_size=3))
)
def test_other_objects_raise_only_our_errors(value):
    with pytest.raises(HookedVLMError):
        to_rgb(value if not isinstance(value, str) else f"/nonexistent/{value}")


# ---------------------------------------------------------------- regressions
def test_float_arrays_of_0_to_255_are_refused_not_white():
    with pytest.raises(ImageLoadError, match=r"from 0 to 200.*divide by 255.*astype\(np.uint8\)"):
        to_rgb(np.concatenate([np.zeros((5, 6, 3)), np.full((5, 6, 3), 200.0)]))


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint16"])
def test_wide_integer_arrays_are_refused_not_darkened(dtype):
    with pytest.raises(ImageLoadError, match=r"astype\(np.uint8\).*// 257"):
        to_rgb(np.full((5, 6, 3), 200, dtype=dtype))
    with pytest.raises(ImageLoadError, match=r"astype\(np.uint8\)"):
        to_rgb(torch.full((3, 5, 6), 200, dtype=TORCH_DTYPES[dtype]))


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5), (5, 0, 3), (3, 0, 5)])
def test_empty_arrays_are_refused(shape):
    with pytest.raises(ImageLoadError, match="empty"):
        to_rgb(np.zeros(shape, dtype=np.uint8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    array = np.full((5, 6), 0.5)
    array[2, 3] = bad
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        to_rgb(array)


def test_ambiguous_layouts_are_refused_not_guessed():
    with pytest.raises(ImageLoadError, match="ambiguous"):
        to_rgb(np.zeros((3, 8, 4), dtype=np.uint8))


def test_tensors_follow_the_array_rule():
    reference = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    chw = torch.from_numpy(reference).permute(2, 0, 1)
    assert np.array_equal(np.asarray(to_rgb(chw)), reference)
    as_bf16 = (chw.double() / 255).to(torch.bfloat16).requires_grad_()
    assert np.array_equal(np.asarray(to_rgb(as_bf16)), reference)
    with pytest.raises(ImageLoadError, match=f"from 0 to {reference.max()}"):
        to_rgb(chw.float())


def test_32_bit_integer_images_made_in_memory_are_refused():
    with pytest.raises(ImageLoadError, match="mode 'I'.*made in memory"):
        to_rgb(Image.fromarray(np.full((5, 6), 200, dtype=np.int32)))


def test_sixteen_bit_files_are_divided_by_257(tmp_path):
    values = np.array([[0, 257 * 200, 65535, 257 * 7 + 128, 257 * 7 + 129]], dtype=np.uint16)
    expected = np.array([0, 200, 255, 7, 8], dtype=np.uint8)
    for suffix in (".png", ".pgm", ".tif"):  # PNG/TIFF open as I;16, 16-bit PGM as I
        path = tmp_path / f"sixteen{suffix}"
        Image.fromarray(values).save(path)
        assert np.array_equal(np.asarray(load_image(path))[0, :, 0], expected), suffix


def test_float_files_follow_the_float_rule(tmp_path):
    Image.fromarray(np.full((4, 5), 0.5, dtype=np.float32)).save(tmp_path / "unit.tif")
    assert load_image(tmp_path / "unit.tif").getpixel((0, 0)) == (128, 128, 128)
    Image.fromarray(np.full((4, 5), 30.0, dtype=np.float32)).save(tmp_path / "wide.tif")
    with pytest.raises(ImageLoadError, match=r"wide.tif.*from 30 to 30"):
        load_image(tmp_path / "wide.tif")


# ---------------------------------------------------------------- the pixel limit
def png_claiming(width: int, height: int) -> bytes:
    """A tiny 8 x 8 PNG whose header claims ``width`` x ``height`` (CRC recomputed)."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 9).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_a_header_of_20000_x_20000_is_refused_naming_size_limit_and_fix(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(20000, 20000))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match=r"20000 x 20000.*89,478,485.*max_pixels=.*--max-pixels"):
        load_image(path)
    with pytest.raises(ImageLoadError, match="20000 x 20000"):
        to_rgb(str(path), max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_a_larger_max_pixels_lifts_pillows_own_limit_for_that_call(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow errors above 200 pixels
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    reference = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    Image.fromarray(reference).save(tmp_path / "big.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "big.png", max_pixels=600)), reference)
    assert Image.MAX_IMAGE_PIXELS == 100
    with pytest.raises(ImageLoadError, match=r"20 x 30 = 600 pixels.*limit is 100"):
        load_image(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match="limit is 599"):
        load_image(tmp_path / "big.png", max_pixels=599)
    assert Image.MAX_IMAGE_PIXELS == 100
    # A header past Pillow's error threshold passes with a large enough max_pixels (the file is
    # then found truncated: it holds 8 x 8 pixels), and is refused by the limit otherwise.
    (tmp_path / "claims.png").write_bytes(png_claiming(100, 100))
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(tmp_path / "claims.png", max_pixels=100 * 100)
    with pytest.raises(ImageLoadError, match="100 x 100"):
        load_image(tmp_path / "claims.png", max_pixels=100 * 100 - 1)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_pillows_bomb_warning_becomes_our_error(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 64 pixels: Pillow would only warn
    monkeypatch.setattr(images, "MAX_PIXELS", 50)
    Image.new("RGB", (8, 8)).save(tmp_path / "warns.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageLoadError, match="8 x 8 = 64 pixels"):
            load_image(tmp_path / "warns.png")


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "many"])
def test_max_pixels_must_be_a_positive_integer(tmp_path, bad):
    Image.new("RGB", (4, 4)).save(tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match="max_pixels must be a positive integer"):
        load_image(tmp_path / "small.png", max_pixels=bad)


# ---------------------------------------------------------------- zip members
def test_zip_members_are_read_without_extracting(tmp_path):
    reference = np.random.default_rng(2).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(reference).save(buffer, "PNG")
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as archive:
        archive.writestr("images/a.png", buffer.getvalue())
        archive.writestr("images/bomb.png", png_claiming(20000, 20000))
        archive.writestr("images/junk.png", b"not a png")
    before = sorted(p.name for p in tmp_path.iterdir())
    path = zip_member_path(tmp_path / "images.zip", "images/a.png")
    assert np.array_equal(np.asarray(load_image(path)), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(ImageLoadError, match="20000 x 20000"):
        load_image(zip_member_path(tmp_path / "images.zip", "images/bomb.png"))
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(zip_member_path(tmp_path / "images.zip", "images/junk.png"))
    with pytest.raises(ImageLoadError, match="not found in the archive"):
        load_image(zip_member_path(tmp_path / "images.zip", "images/b.png"))
    (tmp_path / "fake.zip").write_bytes(b"not a zip")
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(zip_member_path(tmp_path / "fake.zip", "images/a.png"))
