"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP tower on "anyres" tiles -> MLP projector
-> LLaMA/Vicuna/Mistral.

Each image is cut into a base view (the whole image, resized) and high-resolution tiles chosen from
``image_grid_pinpoints``; the processor expands its ``<image>`` into as many placeholders as the
image gives: the base view's patches, then the unpadded high-resolution canvas row by row, each row
followed by one ``image_newline`` vector. The newline slots share the image token but hold no patch:
they are structure slots (``special``, not ``image``). HF's own ``pack_image_features`` lays them
out, so :meth:`LlavaNextAdapter.image_layouts` asks it (on slot indices instead of features).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter
from hooked_vllm.adapters.llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    vision_input_names = ("image_sizes",)
    image_input_names = ("pixel_values", "image_sizes")

    #: The processor's chat template (Vicuna, Mistral and LLaMA-3 checkpoints differ), else LLaVA's.
    format_prompt = VLMAdapter.format_prompt
    #: The base view is the whole image resized onto the grid (no centre crop, unlike LLaVA-1.5).
    image_region = VLMAdapter.image_region

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        config = self.hf_model.config
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: (tile, row, col) of each slot, tile 0 the base view and tiles 1.. the
        high-resolution crops in HF's order; newline slots are ``(-1, -1, -1)``."""
        config = self.hf_model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        per_tile = side * side
        sizes = inputs["image_sizes"].cpu()
        slot_ids = [
            torch.arange(
                image_size_to_num_patches(
                    size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size
                )
                * per_tile,
                dtype=torch.float64,
            ).view(-1, per_tile, 1)
            for size in sizes
        ]
        packed, _ = self.hf_model.model.pack_image_features(
            slot_ids,
            sizes,
            config.vision_feature_select_strategy,
            image_newline=torch.tensor([-1.0], dtype=torch.float64),
        )
        layouts = []
        for slots in packed:
            k = slots[:, 0].long()
            cell = k % per_tile
            grid = torch.stack([k // per_tile, cell // side, cell % side], dim=-1)
            grid[k < 0] = -1
            layouts.append(ImageSlots(grid))
        return layouts
