"""Every tiny model sees its image: two different images give clearly different visual prefixes and
last-position logits.

At HF's initial scales some vision stacks squash the image signal (InstructBLIP's and BLIP-2's ViT
and Q-Former: two images gave visual prefixes 4e-8 to 6e-8 apart). On such a model every test comparing an
image-dependent quantity with HF passes whatever the image path does, so each builder must keep
the image visible (``tiny_models/<family>.py`` re-draws the weights that squash it).

Thresholds, measured on every family at seed 0 (40x40 images, one prompt): the smallest relative
prefix difference was 0.019 (Gemma 4, two noise images), the smallest logit change 2.1e-3 (Aya
Vision, two noise images); InstructBLIP at HF's init gave 4e-8 and 2e-6 (image-blind), with its
patch embedding and cross-attention widened 0.95 and 0.60.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

#: ``|prefix_a - prefix_b| / max(|prefix_a|, |prefix_b|)`` (Frobenius norms over all slots)
MIN_PREFIX_CHANGE = 1e-2
#: ``max |logits_a - logits_b|`` at the last position
MIN_LOGIT_CHANGE = 1e-3
SIZE = 40  # pixels a side: both images give the same number of visual tokens in every family
PROMPT = "Describe the image."


def noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def gradient() -> Image.Image:
    """A smooth image: red grows left to right, green top to bottom."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([x * 255 // SIZE, y * 255 // SIZE, np.full_like(x, 40)], -1)
    return Image.fromarray(pixels.astype(np.uint8))


#: two noise images (what the suite's image tests use) and noise against a smooth image
PAIRS = {"two noise images": (noise(0), noise(1)), "noise vs gradient": (noise(0), gradient())}


def image_sensitivity(vlm, first: Image.Image, second: Image.Image) -> tuple[float, float]:
    """(relative change of the visual prefix, largest change of the last-position logits) when
    ``first`` is replaced by ``second`` under the same prompt."""
    batch = vlm.prepare([first, second], [PROMPT, PROMPT])
    assert batch.attention_mask.bool().all(), "same prompt and size: no padding"
    logits, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
    prefix_a, prefix_b = cache["hook_visual_prefix"].chunk(2)  # [n_slots, d_model], images in turn
    slots = vlm.adapter.placeholder_mask(batch.input_ids).sum(-1)  # LLaVA-NeXT: newlines too
    assert prefix_a.shape == prefix_b.shape and prefix_a.shape[0] == slots[0] == slots[1]
    relative = ((prefix_a - prefix_b).norm() / torch.maximum(prefix_a.norm(), prefix_b.norm())).item()
    return relative, (logits[0, -1] - logits[1, -1]).abs().max().item()


def check_sees_images(family) -> None:
    for label, (first, second) in PAIRS.items():
        prefix_change, logit_change = image_sensitivity(family.vlm, first, second)
        where = f"{family.name}, {label}"
        assert prefix_change > MIN_PREFIX_CHANGE, (
            f"{where}: visual prefixes only {prefix_change:.2g} apart (relative): the tiny model is "
            f"image-blind; re-draw the weights that squash the image in tiny_models/{family.name}.py"
        )
        assert logit_change > MIN_LOGIT_CHANGE, (
            f"{where}: last-position logits change by only {logit_change:.2g} with the image"
        )


def test_llava_and_instructblip_see_their_images(family):
    check_sees_images(family)


def test_every_other_tiny_family_sees_its_images(new_family):
    check_sees_images(new_family)
