"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): SigLIP tower on "anyres" tiles -> MLP
projector -> Qwen2.

LLaVA-NeXT's layout (see :mod:`hooked_vllm.adapters.llava_next`) with three differences:

- **``anyres_max``** (``config.vision_aspect_ratio``, e.g. ``"anyres_max_9"``): when the unpadded
  high-resolution canvas holds more than about ``max`` tiles' worth of patches (HF: ratio
  ``sqrt(rows * cols / (max * side^2)) > 1.1``), HF bilinearly downscales it to
  ``int(rows // ratio) x int(cols // ratio)`` *before* appending one ``image_newline`` slot per row. A
  downscaled slot blends up to four neighbouring high-resolution patches, possibly from different
  crops: there is no slot-to-patch map any more. Such a canvas is reported as one tile (tile 1) whose
  rows and columns are those of the downscaled grid (see :meth:`LlavaOnevisionAdapter.image_layouts`).
- **The base tile carries no newline** when the image is tiled; an image that is not tiled (below) is
  its base tile followed by one ``image_newline`` slot.
- **``batch_num_images``** (per item, from the processor): an image that shares its prompt with other
  images is not tiled (only its base view, padded to a square). The adapter's :meth:`process` hands
  the processor one image list per prompt, as OneVision's multi-image prompts need, and
  :meth:`normalize_inputs` keeps ``batch_num_images`` one entry per item, so that sub-batches take
  theirs along.

The vision tower is SigLIP (no CLS token: ``vision_feature_select_strategy="full"``); the text config
is ``qwen2``, so the bridge's view is ``Qwen2ForCausalLM`` (``AutoModelForCausalLM``'s pick) and
positions are ``cumsum(mask) - 1`` with a 2-D mask, as for LLaVA-NeXT.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from hooked_vllm.adapters.base import ImageSlots
from hooked_vllm.adapters.llava_next import LlavaNextAdapter
from hooked_vllm.errors import BatchFormatError


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    images_per_prompt = (
        True  # several images in one prompt go untiled (batch_num_images), as OneVision was trained
    )
    vision_input_names = ("image_sizes", "batch_num_images")
    image_input_names = ("pixel_values", "image_sizes")
    #: OneVision's chat template (Qwen2's ``<|im_start|>`` turns), for a processor without one
    template = "<|im_start|>user\n{images}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

    # -- processing

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch_num_images`` one entry per item (0 for an item without images), or dropped where
        every entry is 1 (HF then tiles every image, as it does without it).

        The processor gives one entry per item that has images (a flat image list: one per image,
        all 1); one per item is what :meth:`VLMBatch.select <hooked_vllm.model.batch.VLMBatch.select>`
        slices along with the items."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return inputs
        inputs = dict(inputs)
        if bool((counts == 1).all()):
            del inputs["batch_num_images"]
            return inputs
        input_ids = inputs["input_ids"]
        has_images = self.placeholder_mask(input_ids).reshape(-1, input_ids.shape[-1]).any(-1)
        if counts.shape[0] == has_images.shape[0]:
            return inputs
        if counts.shape[0] != int(has_images.sum()):
            raise BatchFormatError(
                f"'batch_num_images' has {counts.shape[0]} entries for a batch of {has_images.shape[0]} "
                f"items, {int(has_images.sum())} of them with images: pass the processor's output as it is."
            )
        per_item = torch.zeros(has_images.shape[0], dtype=counts.dtype, device=counts.device)
        per_item[has_images.to(counts.device)] = counts
        inputs["batch_num_images"] = per_item
        return inputs

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        """HF's ``get_image_features`` (per image: base tile, then the unpadded, possibly downscaled
        canvas with a newline slot after each row), concatenated as HF's forward scatters it."""
        config = self.hf_model.config
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
            batch_num_images=inputs.get("batch_num_images"),
        ).pooler_output
        return torch.cat(list(features))

    def tiled(self, inputs: Mapping[str, torch.Tensor]) -> list[bool]:
        """Per image, whether HF tiles it (``batch_num_images``: only images alone in their prompt)."""
        counts = inputs.get("batch_num_images")
        if counts is None:
            return [True] * self.n_images(inputs)
        return [n == 1 for n in counts.tolist() for _ in range(n)]

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image, (tile, row, col) of each slot, from HF's own ``pack_image_features`` run on
        slot indices:

        - the base view: tile 0, row-major on its ``side x side`` patch grid;
        - a canvas HF keeps at full resolution: as LLaVA-NeXT, tiles 1.. the high-resolution crops
          in HF's order, row and col on the crop's patch grid (exact: slot k *is* that patch);
        - a canvas HF downscales (``anyres_max``): every slot blends several patches, so slots are
          given as tile 1 = the whole downscaled canvas, row and col on its grid (which covers the
          same unpadded region of the image as the full-resolution canvas would);
        - newline slots (after each canvas row, or after the base view of an untiled image):
          ``(-1, -1, -1)``.
        """
        config = self.hf_model.config
        image_size = config.vision_config.image_size
        side = image_size // config.vision_config.patch_size
        per_tile = side * side
        sizes = inputs["image_sizes"].cpu()
        tiles = [
            image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, image_size) if tiled else 1
            for size, tiled in zip(sizes, self.tiled(inputs))
        ]
        slot_ids = [torch.arange(n * per_tile, dtype=torch.float64).view(n, per_tile, 1) for n in tiles]
        packed, _ = self.hf_model.model.pack_image_features(
            slot_ids,
            sizes,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
            vision_aspect_ratio=config.vision_aspect_ratio,
        )
        layouts = []
        for slots, size, n_tiles in zip(packed, sizes, tiles):
            values = slots[:, 0]
            newline = values < 0
            k = values.round().long()
            cell = k % per_tile
            grid = torch.stack([k // per_tile, cell // side, cell % side], dim=-1)
            canvas = torch.arange(len(values)) >= per_tile
            if n_tiles > 1 and int(canvas.sum() - newline.sum()) != _full_canvas_slots(config, size, side):
                # downscaled: rows are delimited by HF's newline slots, columns counted within a row
                canvas_newline = newline[canvas].long()
                row = canvas_newline.cumsum(0) - canvas_newline
                start_of_row = torch.cat([torch.ones(1, dtype=torch.bool), canvas_newline[:-1].bool()])
                run = torch.arange(len(row))
                col = run - torch.cummax(torch.where(start_of_row, run, 0), 0).values
                grid[canvas] = torch.stack([torch.ones_like(row), row, col], dim=-1)
            grid[newline] = -1
            layouts.append(ImageSlots(grid))
        return layouts


def _full_canvas_slots(config, image_size: torch.Tensor, side: int) -> int:
    """Patches of the image's unpadded high-resolution canvas before any downscale (HF's functions)."""
    tiles_h, tiles_w = get_anyres_image_grid_shape(
        image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size
    )
    rows, cols = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), image_size.tolist()).shape[1:]
    return int(rows * cols)
