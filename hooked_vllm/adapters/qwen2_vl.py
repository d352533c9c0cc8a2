"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
a ViT at dynamic resolution, 2x2 patch merge -> Qwen2 language model with M-RoPE.

- The processor expands each ``<|image_pad|>`` into one placeholder per merged patch; the image's
  ``image_grid_thw`` gives its (t, h, w) patch grid, so its slots are row-major on
  ``h/m x w/m`` (m = ``spatial_merge_size``). ``pixel_values`` has one row per patch, not per image.
- Positions are 3-D (temporal, height, width): HF's ``get_rope_index`` gives an image at text
  position p the positions (p, p + row, p + col) and continues the text after the image's largest.
  Given 2-D positions, HF's text model silently falls back to 1-D RoPE, so the adapter always
  computes them.
- The text config (``qwen2_vl_text``/``qwen2_5_vl_text``) has no ``*ForCausalLM`` of its own: the
  bridge is booted on a ``Qwen2ForCausalLM`` view (same module names) around the VLM's own decoder,
  whose rotary embedding folds the three M-RoPE sections into (cos, sin): transformer-lens' attention
  then applies M-RoPE, and ``hook_rot_q``/``hook_rot_k`` hold the rotated queries and keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float, Int
from transformers import Qwen2ForCausalLM

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter


class Qwen2VLAdapter(VLMAdapter):
    family = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    view_class = Qwen2ForCausalLM
    vision_input_names = ("image_grid_thw",)
    token_input_names = ("input_ids", "attention_mask", "mm_token_type_ids")
    image_input_names = ("image_grid_thw",)
    image_placeholder = "<|image_pad|>"
    image_text = "<|vision_start|><|image_pad|><|vision_end|>"

    # -- the vision side
    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        grids = inputs.get("image_grid_thw")
        return 0 if grids is None or inputs.get("pixel_values") is None else int(grids.shape[0])

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        merge = int(self.hf_model.config.vision_config.spatial_merge_size)
        return [
            ImageSlots.rows_by_cols(int(h) // merge, int(w) // merge)
            for _, h, w in inputs["image_grid_thw"].tolist()
        ]

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        grids = inputs["image_grid_thw"]
        return {"image_grid_thw": [1] * len(grids), "pixel_values": grids.prod(-1).tolist()}

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        blocks = self.hf_model.model.visual.blocks
        return {f"vision.blocks.{i}.hook_resid_post": block for i, block in enumerate(blocks)}

    # -- the language model's view of the sequence
    def position_ids(self, inputs: Mapping[str, torch.Tensor]) -> Int[torch.Tensor, "3 batch pos"]:
        """M-RoPE positions from HF's ``get_rope_index``, counted over each item's real tokens."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:
            token_types = self.placeholder_mask(input_ids).int()
        grids = inputs.get("image_grid_thw") if inputs.get("pixel_values") is not None else None
        positions, _ = self.hf_model.model.get_rope_index(input_ids, token_types, grids, attention_mask=mask)
        return positions
