"""PaliGemma and PaliGemma 2 (``PaliGemmaForConditionalGeneration``): SigLIP tower -> linear projector
-> Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) language model, as a prefix LM.

- The processor writes each ``<image>`` as ``image_seq_length`` image tokens (a square grid of the
  SigLIP patches, row-major; every image is resized to the tower's square size, so every image
  gets the same count), then puts BOS *after* the last image token and a newline after the text:
  ``<image> x n <bos>{prompt}\\n``. It returns ``token_type_ids`` (0 on that prefix, 1 on a suffix
  given with ``suffix=``) and ``labels`` (for training: dropped here, see
  :meth:`PaliGemmaAdapter.normalize_inputs`).
- Prefix LM: inside the language model every prefix token (image and prompt) attends to every
  other prefix token, both ways; only the suffix (generated tokens) is causal.
  :meth:`PaliGemmaAdapter.lm_attention_mask` builds the mask as HF's forward does, with
  ``create_causal_mask(..., block_sequence_ids=where(token_type_ids == 0, 0, -1))``; PaliGemma 2's
  Gemma 2 backbone gets the sliding-window mask too (HF's: the window applies to causal pairs, the
  prefix block stays whole), as a ``{"full_attention", "sliding_attention"}`` dict. The mask is
  not causal.
- Positions are 1-indexed (HF: "Paligemma positions are 1-indexed"): ``cumsum(mask)`` over real
  tokens, where other families count from 0. Decoding continues after the largest, as HF's
  ``generate`` does.
- Text embeddings are scaled by sqrt(d_model) inside the embedding module; the image features
  (HF's ``get_image_features``, no scaling of their own in this transformers version) are scattered
  after it, unscaled, as in HF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float, Int
from PIL import Image
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, no_kv_cache
from hooked_vllm.adapters.prompts import chat_prompt
from hooked_vllm.adapters.tokens import token_ids_with_spans
from hooked_vllm.errors import ImageCountError


class PaliGemmaAdapter(VLMAdapter):
    family = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    min_transformers = "5.23"  # measured: 5.22 builds PaliGemma 2's masks differently (logits off by 2e-2)
    token_input_names = ("input_ids", "attention_mask", "token_type_ids")
    plain_causal = False

    # -- prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: the processor's ``<image>``."""
        return getattr(self.processor, "image_token", None) or "<image>"

    def format_prompt(self, instruction: str, n_images: int) -> tuple[str, tuple[int, int]]:
        """PaliGemma's prompt: the images' tokens, back to back, then the instruction (the processor
        adds BOS between them and the closing newline). A processor with a chat template uses it."""
        if getattr(self.processor, "chat_template", None):
            return chat_prompt(self.processor, instruction, n_images, self.template, self.image_placeholder)
        images = "" if self.image_placeholder in instruction else self.image_placeholder * n_images
        return images + instruction, (len(images), len(images) + len(instruction))

    def process(
        self, images: Sequence[Image.Image], prompts: Sequence[str], padding_side: str
    ) -> Mapping[str, torch.Tensor]:
        """The processor call; every prompt needs an image (PaliGemma's processor writes BOS after a
        prompt's image tokens, and mixing prompts with and without images breaks that layout)."""
        bare = [i for i, prompt in enumerate(prompts) if self.count_image_slots(prompt) == 0]
        if bare:
            raise ImageCountError(
                f"Prompt(s) {bare} have no image; PaliGemma needs at least one image for every prompt. "
                "Run text-only prompts as token input (vlm('text')), or give each prompt an image."
            )
        return super().process(images, prompts, padding_side)

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The tokens of ``prompt`` as the processor writes it (BOS after the last image placeholder,
        a newline at the end; one placeholder token per image), with spans in the prompt's characters
        (the added BOS and newline have empty spans)."""
        marker = self.image_placeholder
        if marker not in prompt:
            return token_ids_with_spans(self.tokenizer, prompt)
        cut = prompt.rindex(marker) + len(marker)
        bos = self.tokenizer.bos_token or ""
        ids, spans = token_ids_with_spans(self.tokenizer, prompt[:cut] + bos + prompt[cut:] + "\n")
        end = len(prompt)

        def in_prompt(offset: int) -> int:
            return offset if offset <= cut else min(max(offset - len(bos), cut), end)

        return ids, [(in_prompt(start), in_prompt(stop)) for start, stop in spans]

    # -- processor outputs
    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor's ``labels`` (training targets, -100 on the prefix) never reach the model."""
        inputs.pop("labels", None)
        return inputs

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        return features.flatten(0, 1)

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Every image: the tower's patch grid, ``image_size // patch_size`` square, row-major."""
        vision = self.hf_model.config.vision_config
        side = vision.image_size // vision.patch_size
        return [ImageSlots.rows_by_cols(side, side)] * self.n_images(inputs)

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        tower = self.hf_model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    # -- the language model's view of the sequence
    def position_ids(self, inputs: Mapping[str, torch.Tensor]) -> Int[torch.Tensor, "batch pos"]:
        """1-indexed positions over real tokens (``cumsum(mask)``; padding gets 1), as HF's
        ``generate`` gives them."""
        mask = inputs["attention_mask"].long()
        return mask.cumsum(-1).masked_fill(mask == 0, 1)

    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """HF's prefix-LM mask: causal, plus every pair inside the prefix (``token_type_ids == 0``);
        with sliding-window layers (PaliGemma 2) the full and sliding masks as a dict. Without
        ``token_type_ids`` the mask is causal, as in HF."""
        device = inputs_embeds.device
        kwargs = dict(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(device),
            **no_kv_cache(create_causal_mask),
            position_ids=position_ids,
        )
        token_types = inputs.get("token_type_ids")
        if token_types is not None:
            kwargs["block_sequence_ids"] = torch.where(token_types.to(device) == 0, 0, -1)
        full = create_causal_mask(**kwargs)
        if getattr(self.text_config, "sliding_window", None) is None:
            return full
        return {"full_attention": full, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}
