"""Molmo 2 (``Molmo2ForConditionalGeneration``): a ViT on a low-resolution view of each image plus
overlapping high-resolution crops -> two ViT layers concatenated -> attention pooling of 2x2 patches
-> MLP projector -> a Qwen3-style language model (Molmo2-4B/8B).

- The processor writes each ``<|image|>`` as ``<low_res_im_start>``, the low-resolution view's
  pooled rows of ``<im_patch>`` each closed by ``<im_col>``, ``<im_end>``, then ``<im_start>``, the
  high-resolution canvas's rows likewise, ``<im_end>``. The ``<im_patch>`` tokens are the image
  positions (tile 0: the low-resolution view, tile 1: the crops' canvas, both row-major); the others
  are structure, ``special``.
- **Additive**: HF adds the pooled image features to the ``<im_patch>`` tokens' own embeddings
  instead of putting them in their place (:attr:`visual_prefix_added`). ``hook_visual_prefix`` is the
  added features; zero-ablating it leaves the bare ``<im_patch>`` embedding, as zeroing HF's image
  features does.
- **One bidirectional image block**: every image token of an item (``mm_token_type_ids == 1``:
  patches *and* structure tokens, all of its images together) attends to every other, on top of
  causal attention (HF's ``block_sequence_ids``); the mask is not causal.
- Each image's ``image_token_pooling`` rows index the batch's flattened crop patches, offset over all
  images before it: selecting items re-bases them (:attr:`image_index_inputs`).
- The language model has no ``*ForCausalLM`` of its own: the bridge is booted on a ``Qwen3ForCausalLM``
  view (same module names). Each layer gets the RoPE table HF's text model picks for it (scaled on
  ``rope_scaling_layers``, unscaled elsewhere). Post-norm checkpoints (``norm_after``, Molmo2-O) are
  refused: their layer norms sit where transformer-lens reads the pre-norm ones.
- The processor writes the tokenizer's ``bos_token`` (else ``eos_token``) at the start of every prompt
  that lacks it: :meth:`Molmo2Adapter.format_prompt` writes it, so spans stay exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from jaxtyping import Bool, Float, Int
from transformers import PretrainedConfig, PreTrainedModel, Qwen3ForCausalLM
from transformers.masking_utils import create_causal_mask

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, causal_lm_view, no_kv_cache
from hooked_vllm.errors import UnsupportedModelError


class Molmo2Adapter(VLMAdapter):
    family = "molmo2"
    architectures = ("Molmo2ForConditionalGeneration",)
    min_transformers = "5.23"  # measured on 5.23 only
    view_class = Qwen3ForCausalLM
    visual_prefix_added = True
    plain_causal = False
    vision_input_names = ("image_token_pooling", "image_grids", "image_num_crops")
    token_input_names = ("input_ids", "attention_mask", "mm_token_type_ids")
    image_input_names = ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops")
    image_index_inputs: ClassVar[dict[str, str]] = {"image_token_pooling": "pixel_values"}

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        if getattr(config.get_text_config(), "norm_after", False):
            raise UnsupportedModelError(
                "This Molmo2 checkpoint normalises each sublayer's output (norm_after=True, the OLMo-based "
                "Molmo2-O); hooked-vllm serves the pre-norm Molmo2 checkpoints (Molmo2-4B, Molmo2-8B) only, "
                "since transformer-lens would read its output norms as input norms."
            )

    def language_model(self) -> PreTrainedModel:
        """A ``Qwen3ForCausalLM`` view of Molmo2's text model (per-layer RoPE stays in its forward)."""
        return causal_lm_view(
            self.text_config, self.hf_model.model.language_model, self.hf_model.lm_head, self.view_class
        )

    # -- prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: the processor's ``<|image|>``."""
        return self.processor.image_token

    @property
    def _prompt_start(self) -> str:
        tokenizer = self.tokenizer
        return tokenizer.bos_token or tokenizer.eos_token or ""

    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        """The chat template's (or :attr:`template`'s) prompt, starting with the token the processor
        would otherwise put in front of it."""
        prompt, (start, end) = super().format_prompt(instruction, n_images)
        first = self._prompt_start
        if prompt.startswith(first):
            return prompt, (start, end)
        return first + prompt, (start + len(first), end + len(first))

    @property
    def prompt_markers(self) -> tuple[str, ...]:
        """The image and video markers, and the image structure tokens (``<im_col>``, ``<im_start>``...):
        written in a dataset's text, HF would put them in the image block."""
        structure = self.tokenizer.convert_ids_to_tokens(list(self.processor.image_token_ids))
        return tuple(dict.fromkeys((*super().prompt_markers, *structure)))

    @property
    def video_token_ids(self) -> list[int]:
        """``<|video|>`` and the frame markers (HF's config maps ``video_token_id`` to the image patch)."""
        config = self.hf_model.config
        video = self.tokenizer.convert_tokens_to_ids(self.processor.video_token)
        return [int(video), int(config.frame_start_token_id), int(config.frame_end_token_id)]

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The processor's expansion of an image (patches, ``<im_col>``, starts and ends), and the
        prompt's ``<|image|>`` that it replaces."""
        placeholder = self.tokenizer.convert_tokens_to_ids(self.image_placeholder)
        ids = torch.tensor([*self.processor.image_token_ids, placeholder], device=input_ids.device)
        return torch.isin(input_ids, ids)

    # -- per-image inputs
    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        grids = inputs.get("image_grids")
        return 0 if grids is None else int(grids.shape[0])

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """Crops per image (``pixel_values``), pooled tokens per image (``image_token_pooling``), one
        row per image for the rest."""
        grids = inputs["image_grids"].long()
        rows = {
            "pixel_values": inputs["image_num_crops"].tolist(),
            "image_token_pooling": (grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).tolist(),
            "image_grids": [1] * len(grids),
            "image_num_crops": [1] * len(grids),
        }
        return {name: counts for name, counts in rows.items() if name in inputs}

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: the low-resolution view's pooled grid (tile 0), then the high-resolution
        canvas's (tile 1), each row-major (``image_grids``: rows and columns of both)."""
        layouts = []
        for low_rows, low_cols, high_rows, high_cols in inputs["image_grids"].tolist():
            low = ImageSlots.rows_by_cols(low_rows, low_cols, tile=0)
            high = ImageSlots.rows_by_cols(high_rows, high_cols, tile=1)
            layouts.append(ImageSlots(torch.cat([low.grid, high.grid])))
        return layouts

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        """HF's pooled, projected features of every ``<im_patch>``, images one after another: what
        HF adds to those tokens' embeddings."""
        output = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_token_pooling=inputs["image_token_pooling"],
            image_grids=inputs["image_grids"],
        )
        return torch.cat(list(output.pooler_output))

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        """Each ViT layer's output, ``[n_crops, n_patches, d_vision]`` (every image's crops in turn)."""
        layers = self.hf_model.model.vision_tower.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    # -- the language model's view of the sequence
    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """HF's mask: causal, plus every pair of an item's image tokens (``mm_token_type_ids == 1``,
        else the processor's image tokens) in one bidirectional block."""
        device = inputs_embeds.device
        types = inputs.get("mm_token_type_ids")
        if types is None:
            ids = torch.tensor(self.processor.image_token_ids, device=device)
            types = torch.isin(inputs["input_ids"].to(device), ids).long()
        return create_causal_mask(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(device),
            **no_kv_cache(create_causal_mask),
            position_ids=position_ids,
            block_sequence_ids=torch.where(types.to(device) == 1, 0, -1),
        )
