"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): Qwen2.5-VL's recipe (dynamic resolution, 2x2
merge, M-RoPE, here interleaved) on a Qwen3 language model (q/k norms), plus **DeepStack**: features
of early vision layers are added to the residual stream at the image positions after the first
language-model layers.

- The bridge is booted on a ``Qwen3ForCausalLM`` view (same module names as Qwen3-VL's text layers).
- DeepStack: HF's vision tower returns one feature set per ``deepstack_visual_indexes`` entry;
  feature set k is added to the residual stream after decoder layer k. Each goes through the hook
  point ``blocks.{k}.hook_deepstack`` (``[batch, pos, d_model]``, zero outside the image positions),
  so it can be read, ablated or patched, and residual decompositions count it as its own term.
  ``blocks.{k}.hook_resid_post`` is the block's output *before* the injection;
  ``blocks.{k+1}.hook_resid_pre`` is after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float
from transformers import Qwen3ForCausalLM

from hooked_vllm.adapters.base import VisualFeatures
from hooked_vllm.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    view_class = Qwen3ForCausalLM
    min_transformers = "5.20"  # measured: 5.17 returns DeepStack features in another structure

    def visual_features(self, inputs: Mapping[str, torch.Tensor]) -> VisualFeatures:
        output = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        )
        return VisualFeatures(
            prefix=torch.cat(list(output.pooler_output)),
            injections=tuple(torch.cat(list(per_image)) for per_image in output.deepstack_features),
        )

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        return self.visual_features(inputs).prefix

    @property
    def injection_layers(self) -> tuple[int, ...]:
        return tuple(range(len(self.hf_model.config.vision_config.deepstack_visual_indexes)))

    def injection_inputs(
        self, injections: Sequence[Float[torch.Tensor, "batch pos d_model"]]
    ) -> dict[str, Any]:
        """HF's text model adds ``deepstack_visual_embeds[k]`` at ``visual_pos_masks`` after layer k:
        given every position (the injections are zero off the image positions) it adds them whole."""
        every_position = torch.ones(injections[0].shape[:2], dtype=torch.bool, device=injections[0].device)
        return {
            "visual_pos_masks": every_position,
            "deepstack_visual_embeds": [added.flatten(0, 1) for added in injections],
        }
