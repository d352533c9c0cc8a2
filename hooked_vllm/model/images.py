"""Loading and normalising images to 8-bit RGB before they reach a processor.

Processors expect 3-channel 8-bit images. Every input is converted here by one rule, so that every
path through hooked-vllm sees the same pixels, and an input whose scale is not known is refused
(:class:`~hooked_vllm.errors.ImageLoadError`, naming the fix) instead of guessed from its values:
numbers computed from silently darkened or whitened images would be wrong without any sign of it.

**Arrays and tensors** (``numpy.ndarray``; ``torch.Tensor`` goes through the same rule after
``.detach().cpu().numpy()``, bfloat16 first widened to float32, which is exact):

- Layouts: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with ``C`` in 1 (grey), 3 (RGB) or 4 (RGBA,
  composited over white like RGBA images). A shape that reads both ways, such as ``(3, 8, 4)``, is
  refused as ambiguous; so are empty images (a dimension of 0) and other shapes.
- ``uint8``: 0-255, taken as is. ``bool``: False is black, True is white.
- Floats (float16/32/64, bfloat16 tensors): must lie in [0, 1]; a value ``x`` becomes
  ``floor(x * 255 + 0.5)``. Values outside [0, 1] (0-255 data stored as floats, normalised
  tensors), NaN and inf are refused.
- Other integer types (int8/16/32/64, uint16/32/64) are refused: their scale is not known
  (``.astype(np.uint8)`` converts 0-255 data, ``(a // 257).astype(np.uint8)`` 16-bit data).

**PIL images**, by mode:

- ``RGB``: returned unchanged. ``L``/``1``/``P``/``CMYK``/``YCbCr``/``HSV``/``LAB``/``RGBX``:
  converted to RGB by Pillow.
- ``RGBA``/``LA``/``PA``/``RGBa`` and ``P`` with transparency: composited over a white background
  (the usual choice for photos).
- ``I;16*`` (16-bit; the mode, set by the file format or by ``Image.fromarray`` of a uint16 array,
  defines the depth): ``v`` becomes ``round(v / 257)`` (65535 -> 255), replicated to RGB.
- ``I`` (32-bit integer): Pillow opens 16-bit PGM/PPM files (and 16-bit PNG files in older versions)
  in this mode, so an ``I`` image read from a PNG or PNM file with values in 0-65535 is 16-bit data
  and converted like ``I;16``. Any other ``I`` image (32-bit TIFF files, ``Image.fromarray`` of an
  int32 array) is refused: nothing says what its full scale is.
- ``F`` (32-bit float): the float rule above (values in [0, 1], else refused).
- Empty images (width or height 0) are refused.

**Files** (:func:`load_image`): decoded with Pillow, turned upright as their EXIF orientation tag
says (as transformers' ``load_image`` does), then converted by the mode rules. Before a
file is decoded, its width x height from the header is checked against a pixel limit
(``max_pixels``, default :data:`MAX_PIXELS`, Pillow's own default of about 89.5 million): larger
images, and Pillow's decompression-bomb error and warning, raise :class:`ImageLoadError` naming the
size, the limit and how to raise it. A path ``archive.zip::member`` names a member of a zip archive,
read without extracting anything to disk (Winoground's hub files ship their images as a zip).

Example:
    >>> from PIL import ExifTags, Image, ImageOps
    >>> to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
    >>> to_rgb(np.full((2, 2, 3), 0.5)).getpixel((0, 0))
    (128, 128, 128)
"""

from __future__ import annotations

import struct
import threading
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from hooked_vllm.errors import HookedVLMError, ImageLoadError

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | Path

MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS
"""Default pixel limit (width x height) of :func:`load_image`: Pillow's own limit when this module was
imported. ``None`` lifts it (not advised for files from elsewhere)."""

ZIP_MEMBER_SEPARATOR = "::"
"""``archive.zip::member/name.png`` names a member of a zip archive (see :func:`zip_member_path`)."""

CHANNELS = (1, 3, 4)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_FILE_FORMATS = ("PNG", "PPM")  # formats with at most 16 bits a sample
# What Pillow and zipfile raise on corrupt or unreadable data (OSError covers UnidentifiedImageError).
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
    NotImplementedError,
    RuntimeError,
    Image.DecompressionBombError,
)
_PIL_LIMIT_LOCK = threading.Lock()


def zip_member_path(archive: str | Path, member: str) -> Path:
    """The path :func:`load_image` reads as ``member`` of the zip file ``archive``."""
    return Path(f"{archive}{ZIP_MEMBER_SEPARATOR}{member}")


def _pixel_limit(max_pixels: int | None) -> int | None:
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ImageLoadError(f"max_pixels must be a positive integer (a pixel count); got {limit!r}.")
    return limit


def _too_large(label: str, size: str, limit: int | None) -> ImageLoadError:
    return ImageLoadError(
        f"Image {label} is too large ({size}); the limit is {limit or 0:,} pixels (a guard "
        "against decompression bombs). If the image is genuine, raise the limit: "
        "load_image(..., max_pixels=N) or the CLI's --max-pixels N."
    )


@contextmanager
def _bomb_checks_during_decoding(limit: int | None):
    """Pillow's decompression-bomb checks handled for one decode, Pillow's setting restored after.

    Opening reads only the header: Pillow's check is lifted there, so that this module's own
    check names the size. Decoding (where frames or tiles may be checked again) runs with
    Pillow's limit raised to ``limit`` where that is larger, and Pillow's warning raised as an
    error. Under a lock, as Pillow's limit and the warning filters are process-wide.
    """
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        while_decoding = limit if saved is not None and (limit is None or limit > saved) else saved

        def decoding() -> None:
            Image.MAX_IMAGE_PIXELS = while_decoding

        Image.MAX_IMAGE_PIXELS = None
        try:
            yield decoding
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation tag says (as transformers' ``load_image`` does with
    ``ImageOps.exif_transpose``): a phone photo stored sideways reaches the model upright."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9):
        return image
    upright = ImageOps.exif_transpose(image)
    upright.format = image.format  # the mode rules read it (16-bit files in mode 'I')
    return upright


def _decode(source, label: str, limit: int | None) -> Image.Image:
    """Open ``source`` (a path or a binary file), check its size from the header, decode it."""
    try:
        with _bomb_checks_during_decoding(limit) as decoding, Image.open(source) as image:
            width, height = image.size
            if limit is not None and width * height > limit:
                raise _too_large(label, f"{width} x {height} = {width * height:,} pixels", limit)
            decoding()
            image.load()
            image = _upright(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(label, str(exc), limit) from exc
    except HookedVLMError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"Could not decode image {label}: {exc}. The file is corrupt or not an image; "
            "re-download it or remove it from the dataset (the CLI's --skip-bad skips and lists such files)."
        ) from exc
    try:
        return to_rgb(image)
    except ImageLoadError as exc:
        raise ImageLoadError(f"Image {label}: {exc}") from exc


def _load_zip_member(text: str, limit: int | None) -> Image.Image:
    archive, _, member = text.rpartition(ZIP_MEMBER_SEPARATOR)
    if not Path(archive).is_file():
        raise ImageLoadError(f"Image archive not found: {archive}. Check the path (and --data-dir).")
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise ImageLoadError(
                    f"Image {member} not found in the archive {archive}. Check the name in the "
                    "annotations, or re-download the archive."
                ) from None
            with zf.open(info) as file:
                return _decode(file, text, limit)
    except HookedVLMError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"Could not read {member} from the archive {archive}: {exc}. The archive is corrupt; "
            "re-download it (the CLI's --skip-bad skips and lists such files)."
        ) from exc


def load_image(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open an image file and return it as 8-bit RGB, or raise :class:`ImageLoadError`.

    ``max_pixels`` (default :data:`MAX_PIXELS`) bounds width x height, read from the file's header
    before anything is decoded; a larger limit also lifts Pillow's own check for this call.
    ``"archive.zip::member.png"`` reads a member of a zip archive. Conversion follows the module's
    rules (16-bit files are scaled by 1/257; float files must lie in [0, 1]).
    """
    limit = _pixel_limit(max_pixels)
    text = str(path)
    try:
        is_file = Path(text).is_file()
    except (OSError, ValueError) as exc:  # e.g. a NUL byte in the name
        raise ImageLoadError(f"Invalid image path {text!r}: {exc}. Check the path.") from exc
    if not is_file and ZIP_MEMBER_SEPARATOR in text:
        return _load_zip_member(text, limit)
    if not is_file:
        raise ImageLoadError(f"Image file not found: {text}. Check the path (and --data-dir).")
    return _decode(text, text, limit)


# ---------------------------------------------------------------- arrays and tensors
def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    try:
        tensor = tensor.detach()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()  # exact: every bfloat16 is a float32
        return tensor.cpu().resolve_conj().resolve_neg().numpy()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ImageLoadError(
            f"Cannot read a {tensor.dtype} tensor on {tensor.device} as an image ({exc}). Pass a dense "
            "uint8 tensor of 0-255 values or a float tensor of values in [0, 1]."
        ) from exc


def _to_hwc(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 3:
        first, last = array.shape[0] in CHANNELS, array.shape[-1] in CHANNELS
        if first and last:
            raise ImageLoadError(
                f"The image {what} of shape {array.shape} is ambiguous: it reads as (C, H, W) and as "
                "(H, W, C). Pass a PIL image instead: Image.fromarray(a) for (H, W, C) data, "
                "Image.fromarray(np.moveaxis(a, 0, -1)) for (C, H, W) data (as uint8)."
            )
        if first:
            return np.moveaxis(array, 0, -1)
        if last:
            return array
    if array.ndim == 2:
        return array[:, :, None]
    raise ImageLoadError(
        f"Expected an image {what} of shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3 or 4; got "
        f"{tuple(array.shape)}."
    )


def _floats_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    finite = np.isfinite(array)
    if not finite.all():
        raise ImageLoadError(
            f"The float image {what} contains NaN or infinite values. Replace them (e.g. np.nan_to_num) "
            "and pass values in [0, 1], or a uint8 array of 0-255 values."
        )
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ImageLoadError(
            f"The float image {what} has values from {low:g} to {high:g}; float images must lie in "
            "[0, 1]. For 0-255 data divide by 255, or pass array.astype(np.uint8); undo any "
            "normalisation (mean/std) first."
        )
    return np.floor(array.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    dtype = array.dtype
    if dtype == np.uint8:
        return np.array(array, dtype=np.uint8, order="C", copy=True)
    if dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(dtype, np.floating):
        return _floats_to_uint8(array, what)
    if np.issubdtype(dtype, np.integer):
        raise ImageLoadError(
            f"The image {what} has dtype {dtype}, whose scale is not known (only uint8 is read as "
            "0-255). Convert it: a.astype(np.uint8) for 0-255 data, (a // 257).astype(np.uint8) for "
            "16-bit data, or a float array of values in [0, 1]."
        )
    raise ImageLoadError(
        f"The image {what} has dtype {dtype}; expected uint8 (0-255), bool, or floats in [0, 1]."
    )


def _array_to_rgb(array: np.ndarray, what: str) -> Image.Image:
    if array.size == 0:
        raise ImageLoadError(
            f"The image {what} is empty (shape {tuple(array.shape)}); pass a non-empty image."
        )
    pixels = _to_uint8(_to_hwc(array, what), what)
    pixels = np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[-1] == 1 else pixels)
    return _pil_to_rgb(Image.fromarray(pixels))


# ---------------------------------------------------------------- PIL images
def _composite_over_white(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(grey), mode="L").convert("RGB")


def _sixteen_bit_to_rgb(values: np.ndarray) -> Image.Image:
    """round(v / 257) in integers: 257 * k -> k, 65535 -> 255."""
    return _grey_to_rgb(((values.astype(np.int64) + 128) // 257).astype(np.uint8))


def _int32_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    from_16_bit_file = image.format in _SIXTEEN_BIT_FILE_FORMATS
    if from_16_bit_file and values.min(initial=0) >= 0 and values.max(initial=0) <= 65535:
        return _sixteen_bit_to_rgb(values)
    origin = f"read from a {image.format} file" if image.format else "made in memory"
    raise ImageLoadError(
        f"Cannot convert a 32-bit integer (mode 'I') image {origin} with values from "
        f"{values.min(initial=0)} to {values.max(initial=0)} to 8 bits: its full scale is not known. "
        "Convert it yourself, e.g. Image.fromarray((np.asarray(im) // 257).astype(np.uint8)) for "
        "16-bit data or Image.fromarray(np.asarray(im).astype(np.uint8)) for 0-255 data."
    )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"The {image.mode} image is empty ({image.width} x {image.height}).")
    mode = image.mode
    try:
        if mode == "RGB":
            return image
        if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
            return _composite_over_white(image)
        if mode.startswith("I;16"):
            return _sixteen_bit_to_rgb(np.asarray(image))
        if mode == "I":
            return _int32_to_rgb(image)
        if mode == "F":
            return _grey_to_rgb(_floats_to_uint8(np.asarray(image), "(mode 'F')"))
        return image.convert("RGB")
    except HookedVLMError:
        raise
    except _DECODE_ERRORS as exc:
        raise ImageLoadError(
            f"Could not convert a {mode} image to RGB: {exc}. Convert it to RGB yourself first."
        ) from exc


def item_images(entry: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """One prompt's images as ``vlm.prepare`` takes them: an image, or a list of images for a
    prompt with several."""
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def to_rgb(image: ImageLike, *, max_pixels: int | None = None) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image, or raise :class:`ImageLoadError`.

    Paths are read with :func:`load_image` (``max_pixels`` applies to them). Arrays and tensors:
    uint8 is 0-255, bool is black/white, floats must lie in [0, 1] (``floor(x * 255 + 0.5)``),
    other integer types are refused; layouts (H, W), (H, W, C) and (C, H, W) with C in 1, 3, 4.
    PIL images: by mode (16-bit / 257, alpha over white); see the module docstring for every rule.

    Example:
        >>> to_rgb(torch.ones(3, 2, 2)).getpixel((0, 0))
        (255, 255, 255)
    """
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, torch.Tensor):
        return _array_to_rgb(_tensor_to_numpy(image), f"tensor ({image.dtype})")
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, f"array ({image.dtype})")
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    raise ImageLoadError(
        f"Expected a PIL image, a numpy array, a torch tensor or a file path; got {type(image).__name__}."
    )
