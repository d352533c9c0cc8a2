"""Aya Vision (``AyaVisionForConditionalGeneration``): SigLIP tower on dynamic tiles -> pixel shuffle ->
LayerNorm + SwiGLU projector -> Cohere 2 (Command R7B) language model.

- **Tiles.** The image processor (GotOCR2's) crops each image to the canvas of tiles closest to its
  aspect and, when that is more than one tile, appends a thumbnail (the whole image resized to one
  tile). ``pixel_values`` has one row per tile, all images' tiles one after another. Each tile's
  square patch grid is pixel-shuffled (``downsample_factor`` 2) into a square grid of slots,
  row-major (HF's ``pixel_shuffle``).
- **Prompt.** A prompt writes ``<image>``; the processor replaces it with ``<|START_OF_IMG|>``, per
  crop ``TILE_{i}`` then its ``<|IMG_PATCH|>`` slots, ``TILE_GLOBAL`` then the thumbnail's slots, and
  ``<|END_OF_IMG|>`` (one tile: ``TILE_GLOBAL`` and its slots only). Only the ``<|IMG_PATCH|>`` slots
  receive the visual prefix; the markers and the ``TILE_*`` text are structure (``special``), from
  ``<|START_OF_IMG|>`` to ``<|END_OF_IMG|>`` (:meth:`image_text_mask`). Layout: tile 0 the
  thumbnail (last in the sequence), tiles 1.. the crops in order, as for InternVL.
- **Cohere 2 block.** One LayerNorm (mean-subtracting, no bias) feeds attention and the MLP *in
  parallel*: ``resid_post = resid_pre + attn_out + mlp_out``. transformer-lens's bridge has no
  ``hook_resid_mid`` and no ``ln2`` there (``cfg.parallel_attn_mlp``); ``blocks.{l}.ln1`` is the
  MLP's norm too. Layers alternate sliding-window attention with interleaved RoPE and global
  attention with **no positional encoding at all** (``layer_types``).
- **No logit scale.** Cohere 2's text config has ``logit_scale`` (its ``Cohere2ForCausalLM`` multiplies
  the logits by it), but HF's ``AyaVisionForConditionalGeneration`` puts its own ``lm_head`` on the
  decoder and applies no scale. The language-model view (a ``Cohere2ForCausalLM``) is therefore built
  with ``logit_scale`` 1: the logits, ``W_U`` and the lenses are HF Aya Vision's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int
from transformers import PreTrainedModel

from hooked_vllm.adapters.base import (
    ImageSlots,
    VLMAdapter,
    causal_lm_view,
    pixel_shuffled_grid,
    selected_image_features,
    thumbnail_last_layouts,
)
from hooked_vllm.adapters.tokens import (
    expansion_mask,
    marked_runs,
    marker_blocks,
    real_token_rows,
    token_ids_with_spans,
)
from hooked_vllm.errors import ImageCountError


class AyaVisionAdapter(VLMAdapter):
    family = "aya_vision"
    architectures = ("AyaVisionForConditionalGeneration",)
    #: Aya Vision's (Command R) chat format, where the processor has no chat template
    template = (
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{images}{instruction}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )

    # -- the language model
    def language_model(self) -> PreTrainedModel:
        """A ``Cohere2ForCausalLM`` view with ``logit_scale`` 1, as HF's Aya Vision head has none (the
        view's config is a copy: the HF model's own config is left as loaded)."""
        config = copy.deepcopy(self.text_config)
        config.logit_scale = 1.0
        return causal_lm_view(config, self.hf_model.model.get_decoder(), self.hf_model.lm_head)

    # -- tokens and prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: the processor's ``image_token`` (``<image>``)."""
        return str(self.processor.image_token)

    def _token_id(self, name: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(getattr(self.processor, name)))

    def _markers(self) -> tuple[int, int]:
        return self._token_id("start_of_img_token"), self._token_id("end_of_img_token")

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's tokens with each ``<image>`` written as the processor's image bounds
        (``<|START_OF_IMG|>`` ``<|IMG_PATCH|>`` ``<|END_OF_IMG|>``: special tokens, so the text around
        them tokenizes as it does in the processor's expansion; the caller drops them), each spanning
        the placeholder's characters, whether or not the tokenizer knows ``<image>``."""
        marker = self.image_placeholder
        names = ("start_of_img_token", "img_patch_token", "end_of_img_token")
        block = "".join(getattr(self.processor, name) for name in names)
        text, to_prompt, offset = "", [], 0  # to_prompt[i]: where text character i is in the prompt
        for index, piece in enumerate(prompt.split(marker)):
            if index:
                text += block
                to_prompt += [offset] * len(block)
                offset += len(marker)
            text += piece
            to_prompt += range(offset, offset + len(piece))
            offset += len(piece)
        to_prompt.append(offset)
        ids, spans = token_ids_with_spans(self.tokenizer, text)
        return ids, [(to_prompt[a], to_prompt[b]) for a, b in spans]

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """What the processor writes for each image, ``<|START_OF_IMG|>`` to ``<|END_OF_IMG|>``: the
        slots, the ``TILE_*`` text and the two markers."""
        return expansion_mask(input_ids, self.placeholder_mask, self._blocks)

    def _blocks(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's expansion in one row of token ids."""
        return marker_blocks(tokens, *self._markers())

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = selected_image_features(self.hf_model, inputs["pixel_values"])
        return features.flatten(0, 1)  # [tiles, slots per tile, d] -> tiles in order

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        tower = self.hf_model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Per image, in prompt order, its tiles (rows of ``pixel_values``): the runs of slots in its
        expansion, each run one tile's, as the processor writes them."""
        tiles = []
        for tokens in real_token_rows(inputs):
            for first, last in self._blocks(tokens):
                tiles.append(len(marked_runs(tokens[first:last], self.image_token_id)))
        pixels = inputs.get("pixel_values")
        if pixels is not None and sum(tiles) != pixels.shape[0]:
            raise ImageCountError(
                f"The prompts' images hold {sum(tiles)} tiles of <|IMG_PATCH|> slots but 'pixel_values' has "
                f"{pixels.shape[0]} rows. Build the batch with vlm.prepare or the model's processor."
            )
        return tiles

    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Images in the batch: its ``<|START_OF_IMG|>`` ... ``<|END_OF_IMG|>`` blocks."""
        if inputs.get("pixel_values") is None:
            return 0
        return len(self.tiles_per_image(inputs))

    def _tile_grid(self) -> Int[torch.Tensor, "slots 2"]:
        """(row, col) of each slot of a tile, in HF's order: HF's ``pixel_shuffle`` run on the
        patches' own coordinates (a slot's row and col: its first patch's, divided by the factor)."""
        config = self.hf_model.config
        side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
        shuffle = self.hf_model.model.multi_modal_projector.pixel_shuffle
        return pixel_shuffled_grid(
            side, lambda coords: shuffle(coords.reshape(1, side * side, 2)), int(config.downsample_factor)
        )

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: (tile, row, col) of each slot; **tile 0 is the thumbnail**, last in the sequence,
        tiles 1.. the crops in the processor's order. An image of one tile is tile 0 alone."""
        return thumbnail_last_layouts(self.tiles_per_image(inputs), self._tile_grid())

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        return {"pixel_values": self.tiles_per_image(inputs)}
