"""Mistral 3 (``Mistral3ForConditionalGeneration``: Mistral Small 3.1/3.2, Ministral 3): Pixtral tower ->
RMSNorm -> patch merger -> MLP projector -> Mistral or Ministral 3 language model.

- **Vision.** Each image keeps its own size (the processor resizes its longest edge to
  ``size["longest_edge"]`` in whole cells of ``patch_size * spatial_merge_size`` pixels, then pads
  ``pixel_values`` to the batch's largest image; ``image_sizes`` says how much of each is real). The
  Pixtral tower cuts each image into its own ``h x w`` patch grid, runs all images as one sequence
  with a block-diagonal mask (an image sees only itself) and 2-D RoPE on (row, col) within the image;
  the patch merger then folds each 2x2 block of patches into one slot: ``h/2 x w/2`` slots per image,
  row-major.
- **Prompt.** The processor expands each ``[IMG]`` into the image's rows of ``[IMG]`` slots, each row
  followed by ``[IMG_BREAK]``, the last by ``[IMG_END]`` instead. Only the ``[IMG]`` slots receive the
  visual prefix (HF's ``get_placeholder_mask``); ``[IMG_BREAK]`` and ``[IMG_END]`` are tokens the
  language model embeds as text: structure, so ``special``, not ``image`` (:meth:`image_text_mask`),
  and not slots of :meth:`image_layouts` (which holds the ``[IMG]`` slots only: ``(0, row, col)``).
- **Positions.** ``cumsum(mask) - 1``, as HF's ``generate`` computes them. They matter beyond RoPE
  here: Ministral 3 (text ``model_type`` ``ministral3``) multiplies each query after RoPE by the
  llama-4 scale ``1 + beta * log(1 + floor(pos / original_max_position_embeddings))``
  (``rope_parameters["llama_4_scaling_beta"]``, 0.1 and 16384 in the real checkpoints), a function of
  the absolute position; transformer-lens's attention reconstruction applies it from the
  ``position_ids`` it is handed. Mistral Small 3.1's text model (``mistral``) has no such scale.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter


class Mistral3Adapter(VLMAdapter):
    family = "mistral3"
    architectures = ("Mistral3ForConditionalGeneration",)
    vision_input_names = ("image_sizes",)
    image_input_names = ("pixel_values", "image_sizes")
    image_placeholder = "[IMG]"
    #: Mistral's instruction format, where the processor has no chat template (BOS from the tokenizer)
    template = "[INST]{images}{instruction}[/INST]"

    # -- tokens
    @property
    def structure_token_ids(self) -> tuple[int, int]:
        """``([IMG_BREAK], [IMG_END])``: the tokens closing each row of an image's slots."""
        processor = self.processor
        names = (
            getattr(processor, "image_break_token", None) or "[IMG_BREAK]",
            getattr(processor, "image_end_token", None) or "[IMG_END]",
        )
        return tuple(int(self.tokenizer.convert_tokens_to_ids(name)) for name in names)

    @property
    def prompt_markers(self) -> tuple[str, ...]:
        """The image token, and ``[IMG_BREAK]``/``[IMG_END]``: text holding them would be read as an
        image's structure."""
        names = self.tokenizer.convert_ids_to_tokens(list(self.structure_token_ids))
        return tuple(dict.fromkeys((*super().prompt_markers, *names)))

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The ``[IMG]`` slots and the ``[IMG_BREAK]``/``[IMG_END]`` tokens the processor writes after
        each row of them."""
        structure = torch.tensor(self.structure_token_ids, device=input_ids.device)
        return self.placeholder_mask(input_ids) | torch.isin(input_ids, structure)

    # -- the vision side
    def _slot_grids(self, inputs: Mapping[str, torch.Tensor]) -> list[tuple[int, int]]:
        """``(rows, cols)`` of each image's slots, from its real size, as HF's merger cuts them."""
        config = self.hf_model.config
        cell = config.vision_config.patch_size * config.spatial_merge_size
        return [(int(h) // cell, int(w) // cell) for h, w in inputs["image_sizes"].tolist()]

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=inputs["image_sizes"],
            vision_feature_layer=self.hf_model.config.vision_feature_layer,
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: its ``rows x cols`` merged patch grid, row-major (one tile)."""
        return [ImageSlots.rows_by_cols(rows, cols) for rows, cols in self._slot_grids(inputs)]

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.model.vision_tower.transformer.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}
