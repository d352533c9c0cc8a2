"""Loading and normalising images to 8-bit RGB before they reach a processor.

Processors expect 3-channel 8-bit images. Greyscale, palette, alpha, CMYK and 16-bit images are
converted here so that every path through hooked-vllm sees the same pixels:

- ``L``/``1``/``P``/``CMYK``/``YCbCr``/``HSV``/``LAB``: converted to RGB by Pillow.
- ``RGBA``/``LA``/``PA``: composited over a white background (the usual choice for photos).
- ``I;16*``/``I``/``F`` (16-bit, 32-bit integer or float greyscale): rescaled by the type's range
  (16-bit: /257; float: clipped to [0, 1] then *255) and replicated to RGB.

Example:
    >>> from PIL import Image
    >>> to_rgb(Image.new("RGBA", (4, 4), (255, 0, 0, 0))).getpixel((0, 0))
    (255, 255, 255)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from hooked_vllm.errors import ImageLoadError

ImageLike = Image.Image | np.ndarray | str | Path


def load_image(path: str | Path) -> Image.Image:
    """Open an image file and return it as 8-bit RGB, or raise :class:`ImageLoadError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"Image file not found: {path}. Check the path (and --data-dir).")
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageLoadError(
            f"Could not decode image {path}: {exc}. The file is corrupt or not an image; "
            "re-download it or remove it from the dataset (the CLI's --skip-bad skips and lists such files)."
        ) from exc


def _rescale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if array.dtype in (np.uint16, np.int32, np.int64, np.uint32) or mode.startswith("I"):
        top = 65535.0 if array.max(initial=0) <= 65535 else float(np.iinfo(array.dtype).max)
        return (np.clip(array, 0, None).astype(np.float64) / top * 255.0 + 0.5).astype(np.uint8)
    raise ImageLoadError(
        f"Unsupported pixel type {array.dtype} (mode {mode!r}). Convert the image to 8-bit RGB first."
    )


def to_rgb(image: ImageLike) -> Image.Image:
    """Return ``image`` as an 8-bit RGB PIL image (see the module docstring for the rules)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = np.moveaxis(array, 0, -1)  # CHW -> HWC
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ImageLoadError(
                f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}."
            )
        array = _rescale_to_uint8(array, "array")
        return to_rgb(Image.fromarray(array))
    if not isinstance(image, Image.Image):
        raise ImageLoadError(
            f"Expected a PIL image, a numpy array or a file path; got {type(image).__name__}."
        )
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        array = _rescale_to_uint8(np.asarray(image), mode)
        return Image.fromarray(array).convert("RGB")
    return image.convert("RGB")
