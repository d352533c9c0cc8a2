"""Gemma 4 (``Gemma4ForConditionalGeneration``): a ViT with 2-D RoPE whose patches are average-pooled
k x k into soft tokens -> norm + projection (``embed_vision``) -> the Gemma 4 language model.

- Images keep their aspect ratio: each fills ``rows x cols`` soft tokens (rows and cols from its
  patch grid, ``image_position_ids``, over the pooling kernel), up to the processor's budget, so
  counts differ per image. The prompt writes ``<|image|>``; the processor expands it to ``<|image>``,
  the soft tokens and ``<image|>``. The soft tokens are the image positions (row-major);
  ``<|image>``/``<image|>`` are special.
- Inside the language model an image's soft tokens attend to each other both ways
  (``mm_token_type_ids``, where ``use_bidirectional_attention="vision"``) **in the sliding-window
  layers only**; full-attention layers stay causal. :meth:`Gemma4Adapter.lm_attention_mask` builds
  both masks with HF's ``create_masks_for_vision_model``, as HF's forward does.
- Per-layer embeddings (E2B/E4B): every layer l adds ``per_layer_projection(act(per_layer_input_gate(h))
  * p_l)`` to its output, p_l = (a projection of the input embeddings + an embedding of the token id)
  / sqrt(2). HF embeds the token ids with the image placeholders replaced by the pad token
  (:meth:`Gemma4Adapter.lm_extra_inputs`); the projection sees the image features. p_l is the hook
  point ``blocks.{l}.hook_per_layer_input`` (``[batch, pos, d_per_layer]``); the vector added,
  ``blocks.{l}.post_per_layer_input_norm.hook_out``, is the decompositions' term
  ``"{l}_per_layer_input"`` (:meth:`Gemma4Adapter.stream_terms`).
- Every layer ends by multiplying the whole stream by its ``layer_scalar``
  (:meth:`Gemma4Adapter.stream_scales`): a term added at layer l reaches the final stream times the
  scalars of layers l and after.
- KV sharing (E2B/E4B): the last ``num_kv_shared_layers`` layers compute no keys or values; each
  attends with those of the last earlier layer of its type. The value vectors a layer weighs
  (``v_norm``'s output: HF RMS-normalises values) are :meth:`Gemma4Adapter.value_hooks`.
- The 26B-A4B layout: full-attention layers whose keys are their values (``attention_k_eq_v``), and
  in every layer a router and routed experts beside the dense MLP (``blocks.{l}.router.hook_out``:
  the router's probabilities, ``blocks.{l}.mlp.experts.{e}.hook_out``: each expert's weighted output).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from transformers import PretrainedConfig, PreTrainedModel
from transformers.models.gemma4.modeling_gemma4 import (
    create_masks_for_vision_model,
    get_block_sequence_ids_for_mask,
)

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter, kv_shared_value_hooks, no_kv_cache
from hooked_vllm.errors import UnsupportedModelError


class Gemma4Adapter(VLMAdapter):
    family = "gemma4"
    architectures = ("Gemma4ForConditionalGeneration",)
    images_per_prompt = True  # the processor takes each prompt's images as a list
    token_input_names = ("input_ids", "attention_mask", "mm_token_type_ids")
    image_input_names = ("pixel_values", "image_position_ids")
    vision_input_names = ("image_position_ids",)
    plain_causal = False

    def __init__(self, hf_model: PreTrainedModel, processor: Any) -> None:
        super().__init__(hf_model, processor)
        # HF's default picks grouped_mm where it can: other sums than the loop the hooks reproduce
        if self.text_config.enable_moe_block:
            hf_model.set_experts_implementation("eager")

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        text = config.get_text_config()
        if getattr(text, "use_bidirectional_attention", None) == "all":
            raise UnsupportedModelError(
                "This Gemma 4 has use_bidirectional_attention='all': every token attends both ways, so "
                "it is no decoder with a visual prefix. hooked-vllm serves Gemma 4 with causal text "
                "attention (use_bidirectional_attention None or 'vision')."
            )
        if getattr(config, "vision_config", None) is None:
            raise UnsupportedModelError(
                "This Gemma4ForConditionalGeneration has no vision tower (vision_config is None): there "
                "is no visual prefix to study. Load a checkpoint with a vision_config."
            )

    # -- prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: ``<|image|>``."""
        return self.processor.image_token

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The processor's whole expansion of an image: ``<|image>``, the soft tokens, ``<image|>``."""
        config = self.hf_model.config
        return (
            self.placeholder_mask(input_ids)
            | (input_ids == config.boi_token_id)
            | (input_ids == config.eoi_token_id)
        )

    # -- the vision side
    @property
    def _pool(self) -> int:
        return int(self.hf_model.config.vision_config.pooling_kernel_size)

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_position_ids=inputs["image_position_ids"]
        ).pooler_output
        return torch.cat(list(features), dim=0)

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.model.vision_tower.encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image, its soft tokens row-major on its pooled grid: the pooler's order (soft token
        ``x // k + (width // k) * (y // k)`` of patch ``(x, y)``)."""
        layouts = []
        for positions in inputs.get("image_position_ids", ()):
            real = positions[(positions >= 0).all(-1)]
            cols, rows = (int(real[:, axis].max()) + 1 for axis in (0, 1))
            layouts.append(ImageSlots.rows_by_cols(rows // self._pool, cols // self._pool))
        return layouts

    # -- the language model's view of the sequence
    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        """HF's full and sliding-window masks; in the sliding ones each image's soft tokens are a
        bidirectional block (where the model has ``use_bidirectional_attention="vision"``)."""
        attention_mask = inputs["attention_mask"].to(inputs_embeds.device)
        if self.text_config.use_bidirectional_attention != "vision":
            return attention_mask
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:
            token_types = self.placeholder_mask(inputs["input_ids"]).long()
        return create_masks_for_vision_model(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            **no_kv_cache(create_masks_for_vision_model),
            position_ids=position_ids,
            block_sequence_ids=get_block_sequence_ids_for_mask(token_types, device=inputs_embeds.device),
        )

    def lm_extra_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``per_layer_inputs``: the token-identity half of the per-layer embeddings, of the token ids
        with the image (and audio) placeholders replaced by the pad token, as HF's forward embeds them;
        the language model adds the projection of its input embeddings. None without per-layer
        embeddings."""
        if not self.text_config.hidden_size_per_layer_input:
            return {}
        config, input_ids = self.hf_model.config, inputs["input_ids"]
        placeholders = (input_ids == config.image_token_id) | (input_ids == config.audio_token_id)
        ids = input_ids.masked_fill(placeholders, self.text_config.pad_token_id)
        return {"per_layer_inputs": self.hf_model.model.language_model.get_per_layer_inputs(ids)}

    def per_layer_input_sites(self) -> dict[int, torch.nn.Module]:
        if not self.text_config.hidden_size_per_layer_input:
            return {}
        return dict(enumerate(self.hf_model.model.language_model.layers))

    def stream_terms(self) -> dict[int, dict[str, str]]:
        """Each layer's per-layer-input branch, ``post_per_layer_input_norm``'s output, added after the
        MLP: the term ``"{l}_per_layer_input"`` of the residual decompositions."""
        if not self.text_config.hidden_size_per_layer_input:
            return {}
        layers = range(len(self.hf_model.model.language_model.layers))
        return {
            layer: {"per_layer_input": f"blocks.{layer}.post_per_layer_input_norm.hook_out"}
            for layer in layers
        }

    def stream_scales(self) -> dict[int, Float[torch.Tensor, "1"]]:
        """Each layer's ``layer_scalar``: HF multiplies the whole stream by it at the layer's end."""
        return {
            layer: block.layer_scalar for layer, block in enumerate(self.hf_model.model.language_model.layers)
        }

    def value_hooks(self) -> dict[int, str]:
        """The values each layer weighs: ``v_norm``'s output (HF RMS-normalises them after
        ``v_proj``, or after ``k_proj`` where keys are values), that of the layer it shares them with
        for the KV-shared layers."""
        return kv_shared_value_hooks(self.text_config)

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        if not self.text_config.enable_moe_block:
            return {}
        return dict(enumerate(layer.experts for layer in self.hf_model.model.language_model.layers))
