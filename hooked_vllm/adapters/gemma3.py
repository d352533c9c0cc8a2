"""Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP tower -> average pool + RMS norm + projection
-> Gemma 3 language model.

- The processor expands each ``<start_of_image>`` into ``\\n\\n<start_of_image>`` +
  ``mm_tokens_per_image`` soft tokens + ``<end_of_image>\\n\\n``. The soft tokens are the image
  positions (a square grid, row-major); begin/end of image and the newlines are special.
- Inside the language model an image's soft tokens attend to each other bidirectionally
  (``token_type_ids``), on top of causal attention; sliding-window layers apply their window on top
  of that. :meth:`Gemma3Adapter.lm_attention_mask` builds both masks with HF's
  ``create_masks_for_vision_model``, as HF's forward does: the mask is not causal.
- Text embeddings are scaled by sqrt(d_model) inside the embedding module; the image features are
  scattered after it, unscaled (HF does the same).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int
from transformers.models.gemma3.modeling_gemma3 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

from hooked_vllm.adapters.base import VLMAdapter, no_kv_cache
from hooked_vllm.adapters.tokens import token_ids_with_spans


class Gemma3Adapter(VLMAdapter):
    family = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    images_per_prompt = True  # the processor takes each prompt's images as a list
    token_input_names = ("input_ids", "attention_mask", "token_type_ids")
    plain_causal = False

    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: ``<start_of_image>``."""
        return self.processor.boi_token

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The tokens of the prompt as the processor expands it (one soft token per image: the
        caller drops the image tokens), with spans in the unexpanded prompt's characters."""
        marker = self.image_placeholder
        expansion = self.processor.full_image_sequence
        soft = self.tokenizer.image_token
        expansion = (
            expansion[: expansion.index(soft) + len(soft)] + expansion[expansion.rindex(soft) + len(soft) :]
        )
        pieces = prompt.split(marker)
        expanded, moved = pieces[0], []  # moved: (start in expanded text, shift back to the prompt)
        for piece in pieces[1:]:
            moved.append((len(expanded), len(expanded) + len(expansion), len(expansion) - len(marker)))
            expanded += expansion + piece
        ids, spans = token_ids_with_spans(self.tokenizer, expanded)
        return ids, [_span_in_prompt(span, moved) for span in spans]

    def image_bound_ids(self) -> tuple[int, int]:
        """The ids of ``<start_of_image>`` and ``<end_of_image>`` (``*_token_index`` in the config)."""
        config = self.hf_model.config
        return config.boi_token_index, config.eoi_token_index

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The processor's whole expansion of an image: the soft tokens, ``<start_of_image>``,
        ``<end_of_image>`` and the blank lines it writes around them (never instruction text)."""
        begin_id, end_id = self.image_bound_ids()
        mask = self.placeholder_mask(input_ids)
        begin, end = input_ids == begin_id, input_ids == end_id
        mask = mask | begin | end
        blank = self.tokenizer("\n\n", add_special_tokens=False).input_ids
        k = len(blank)
        for row, at in begin.nonzero().tolist():
            if at >= k and input_ids[row, at - k : at].tolist() == blank:
                mask[row, at - k : at] = True
        for row, at in end.nonzero().tolist():
            if input_ids[row, at + 1 : at + 1 + k].tolist() == blank:
                mask[row, at + 1 : at + 1 + k] = True
        return mask

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        return features.flatten(0, 1)

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        tower = self.hf_model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    # -- the language model's view of the sequence
    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """HF's full and sliding-window masks, each image's soft tokens a bidirectional block."""
        token_types = inputs.get("token_type_ids")
        if token_types is None:
            token_types = self.placeholder_mask(inputs["input_ids"]).long()
        return create_masks_for_vision_model(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(inputs_embeds.device),
            **no_kv_cache(create_masks_for_vision_model),
            position_ids=position_ids,
            block_sequence_ids=get_block_sequence_ids_for_mask(token_types.to(inputs_embeds.device)),
        )


def _span_in_prompt(span: tuple[int, int], moved: list[tuple[int, int, int]]) -> tuple[int, int]:
    """A character span of the expanded prompt in the prompt's characters (inside an expansion: empty)."""
    start, end = span
    shift = 0
    for first, last, delta in moved:
        if start >= last:
            shift += delta
        elif start >= first:
            return (first - shift, first - shift)
    return (start - shift, end - shift)
