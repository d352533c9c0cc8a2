"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower -> 2-layer MLP projector -> LLaMA/Vicuna.

Each ``<image>`` in the prompt is expanded by the processor into one placeholder per projected
patch (576 for CLIP ViT-L/14 at 336px with the CLS token dropped); the projector's outputs replace
those positions. ``vision_feature_layer`` and ``vision_feature_select_strategy`` come from the
model's config, as in HF.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float

from hooked_vllm.adapters.base import VLMAdapter, selected_image_features


class LlavaAdapter(VLMAdapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    #: LLaVA-1.5's conversation template (the ``llava-hf`` model cards' format), used as it is.
    template = "USER: {images}\n{instruction} ASSISTANT:"

    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        """LLaVA-1.5's conversation template, as the ``llava-hf`` model cards write it.

        An instruction that already holds ``<image>`` placeholders keeps them where the user put them.
        """
        placed_by_user = self.image_placeholder in instruction
        images = "" if placed_by_user else "\n".join([self.image_placeholder] * n_images)
        prefix = self.template.split("{instruction}")[0].format(images=images)
        prompt = self.template.format(images=images, instruction=instruction)
        return prompt, (len(prefix), len(prefix) + len(instruction))

    def image_region(self, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """CLIP's processor (``do_center_crop``, as ``llava-hf/llava-1.5-*`` ship it) resizes the
        shorter side to ``size["shortest_edge"]`` and keeps the centre ``crop_size``: the patch grid
        covers that centre box of a non-square image, not the whole of it."""
        processor = self.processor.image_processor
        width, height = size
        if not getattr(processor, "do_center_crop", False) or not getattr(processor, "crop_size", None):
            return super().image_region(size)
        shortest = processor.size.get("shortest_edge") if getattr(processor, "do_resize", True) else None
        scale = shortest / min(width, height) if shortest else 1.0
        crop_w = min(processor.crop_size["width"] / scale, width)
        crop_h = min(processor.crop_size["height"] / scale, height)
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return (left, top, left + crop_w, top + crop_h)

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = selected_image_features(self.hf_model, inputs["pixel_values"])
        if isinstance(features, (list, tuple)):
            return torch.cat(list(features))
        return features.flatten(0, 1)

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        tower = self.hf_model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}
