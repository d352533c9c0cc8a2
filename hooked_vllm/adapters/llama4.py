"""Llama 4 (``Llama4ForConditionalGeneration``): a ViT on tiles plus a global view -> pixel shuffle and
an MLP adapter -> a linear projector -> Llama 4's text model.

- **Tiles.** The image processor fits each image on a canvas of up to ``max_patches`` tiles and cuts
  it into ``rows x cols`` tiles, row by row; with more than one tile the whole image resized to one
  tile (the *global view*) follows them. ``pixel_values`` has one row per tile, ``[total tiles, 3, H,
  W]``, all images' tiles in turn, in **bfloat16** (the processor rescales in bfloat16, as Meta's
  code does): :meth:`Llama4Adapter.normalize_inputs` casts them to the model's dtype (exact from
  bfloat16 to float32), so HF's own forward takes them too.
- **Prompt.** A prompt writes ``<|image|>``; the processor expands it to ``<|image_start|>``, per crop
  ``<|patch|>`` x slots per tile with ``<|tile_x_separator|>`` between the crops of a row and
  ``<|tile_y_separator|>`` after each row, then ``<|image|>`` and the global view's ``<|patch|>``
  slots, then ``<|image_end|>`` (an image of one tile: ``<|image_start|><|image|>``, its slots,
  ``<|image_end|>``). Only ``<|patch|>`` (``config.image_token_id``) receives the visual prefix; the
  other tokens are structure (``special``).
- **Slots per tile:** the ViT's patch grid (a CLS token appended, then dropped) after HF's
  ``pixel_shuffle`` (ratio 0.5: 2x2 patches per slot), row-major.
- **Text model.** Layers with RoPE (``no_rope_layers[l] == 1``; complex, interleaved pairs) use the
  weightless L2 q/k norm after RoPE and **chunked attention** (a query sees the keys of its own chunk
  of ``attention_chunk_size`` positions, counted from the item's first real token); the NoPE layers
  attend causally to everything and scale their queries by HF's temperature tuning. HF's outer
  forward passes no positions (``arange``, padding counted): we pass ``cumsum(mask) - 1`` and the two
  masks HF's text model would build, ``{"full_attention", "chunked_attention"}``.
- **Attention hooks.** transformer-lens 4.3's ``llama4`` adapter keeps HF's attention whole
  (``maintain_native_attention``): its ``hook_pattern`` and ``hook_attn_scores`` fire after the fact
  (the scores on the *pattern*), and an edit there changes nothing. :func:`llama4_attention_forward`
  replaces the bridge's forward with HF's ``Llama4TextAttention.forward`` step by step, firing
  ``hook_rot_q``/``hook_rot_k`` (q and k as they enter the scores: after RoPE, q/k norm and
  temperature), ``hook_attn_scores`` (scaled, masked, before the softmax), ``hook_pattern``; the
  q/k/v/o linears keep their hooks (``hook_q``... before RoPE).
- **Temperature tuning counts cache slots.** HF scales the NoPE layers' queries by
  ``1 + attn_scale * log1p(floor((slot + 1) / floor_scale))`` with the *slot* index, padding included,
  not the position. Below ``floor_scale`` (8192 in the real configs) slots the scale is 1 everywhere;
  beyond it a left-padded item's result depends on its padding, in HF and here alike.
- **Mixture of experts.** On ``moe_layers`` the MLP is ``Llama4TextMoe``: the router keeps the top
  ``num_experts_per_tok`` logits and passes them through a sigmoid (no renormalisation); each expert
  takes the token *already multiplied by its score* (zero where not chosen) and all experts run on all
  tokens as one batched matmul; a shared expert's output is added. :meth:`routed_experts` gives each
  expert's output a hook point (:mod:`hooked_vllm.model.experts`). Other layers are dense SwiGLU MLPs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_chunked_causal_mask
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb, pixel_shuffle, repeat_kv

from hooked_vllm.adapters.base import (
    ImageSlots,
    VLMAdapter,
    causal_lm_view,
    no_kv_cache,
    pixel_shuffled_grid,
    thumbnail_last_layouts,
)
from hooked_vllm.adapters.tokens import expansion_mask, marker_blocks, real_token_rows
from hooked_vllm.errors import ImageCountError


class Llama4Adapter(VLMAdapter):
    family = "llama4"
    architectures = ("Llama4ForConditionalGeneration",)
    image_placeholder = "<|image|>"
    #: Llama 4's chat format, where the processor has no chat template (its class default has one)
    template = (
        "<|header_start|>user<|header_end|>\n\n{images}{instruction}<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n"
    )
    plain_causal = False  # chunked attention on the RoPE layers

    # -- the language model
    def language_model(self) -> PreTrainedModel:
        causal_lm = self.hf_model.language_model  # a Llama4ForCausalLM already; no ``.model`` on the VLM
        return causal_lm_view(self.text_config, causal_lm.model, causal_lm.lm_head)

    def attention_forward(self):
        return llama4_attention_forward

    @property
    def decodes_left_padded(self) -> bool:
        """Chunks count cache slots when decoding: a right-padded item's padding would shift them."""
        return True

    def routed_experts(self) -> dict[int, torch.nn.Module]:
        layers = self.hf_model.language_model.model.layers
        return {layer: block.feed_forward.experts for layer, block in enumerate(layers) if block.is_moe_layer}

    # -- tokens
    def _token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def structure_token_ids(self) -> tuple[int, int, int, int, int]:
        """``<|image_start|>``, ``<|image|>``, ``<|tile_x_separator|>``, ``<|tile_y_separator|>``,
        ``<|image_end|>``: the text the processor writes around an image's slots."""
        processor = self.processor
        names = {
            "start_of_img_token": "<|image_start|>",
            "image_token": "<|image|>",
            "tile_token": "<|tile_x_separator|>",
            "tile_global_token": "<|tile_y_separator|>",
            "end_of_img_token": "<|image_end|>",
        }
        return tuple(self._token_id(getattr(processor, name, token)) for name, token in names.items())

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """Each image's expansion, ``<|image_start|>`` to ``<|image_end|>``, and any ``<|image|>`` or
        ``<|patch|>`` outside one (a prompt's own placeholder)."""
        start, image, *_, end = self.structure_token_ids
        return expansion_mask(
            input_ids,
            lambda ids: self.placeholder_mask(ids) | (ids == image),
            lambda row: marker_blocks(row, start, end),
        )

    def _expansions_of(self, inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
        """Each image's expansion (token ids, real positions only), items in turn."""
        start, *_, end = self.structure_token_ids
        out = []
        for tokens in real_token_rows(inputs):
            out += [tokens[first:last] for first, last in marker_blocks(tokens, start, end)]
        return out

    # -- processing
    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``pixel_values`` in the vision model's dtype (the processor gives bfloat16)."""
        pixels = inputs.get("pixel_values")
        dtype = self.hf_model.vision_model.patch_embedding.linear.weight.dtype
        if pixels is None or pixels.dtype == dtype or not pixels.is_floating_point():
            return inputs
        return {**inputs, "pixel_values": pixels.to(dtype)}

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        """HF's forward: the vision model's output, every tile's slots in turn, projected."""
        features = self.hf_model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        features = features.last_hidden_state
        return self.hf_model.multi_modal_projector(features.reshape(-1, features.shape[-1]))

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.vision_model.model.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Images in the batch: their expansions (``pixel_values`` has one row per tile)."""
        if inputs.get("pixel_values") is None:
            return 0
        return len(self._expansions_of(inputs))

    @property
    def slots_per_tile(self) -> int:
        return int(self._tile_grid().shape[0])

    def _tile_grid(self) -> Int[torch.Tensor, "slots 2"]:
        """(row, col) of each slot of a tile on its shuffled grid, in HF's order: HF's
        ``pixel_shuffle`` run on the patches' coordinates (a slot's row and col: those of the first
        patch it merges, divided by the merge factor)."""
        vision = self.hf_model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        ratio = vision.pixel_shuffle_ratio
        return pixel_shuffled_grid(
            side, lambda coords: pixel_shuffle(coords.reshape(1, side * side, 2), ratio), round(1 / ratio)
        )

    def _crop_grid(self, block: list[int]) -> tuple[int, int]:
        """``(rows, cols)`` of an image's crops, read from its expansion (``(0, 0)``: one tile, no
        crops): a ``<|tile_y_separator|>`` ends each row, ``<|tile_x_separator|>`` parts its crops."""
        _, _, x_sep, y_sep, _ = self.structure_token_ids
        rows = block.count(y_sep)
        if rows == 0:
            return 0, 0
        return rows, block.count(x_sep) // rows + 1

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Per image, its rows of ``pixel_values``: its crops, plus the global view when it has
        crops; checked against its ``<|patch|>`` slots and the tiles in ``pixel_values``."""
        per_tile, image = self.slots_per_tile, self.image_token_id
        tiles, slots = [], []
        for block in self._expansions_of(inputs):
            rows, cols = self._crop_grid(block)
            tiles.append(rows * cols + 1 if rows else 1)
            slots.append(block.count(image))
        pixels = inputs.get("pixel_values")
        if [t * per_tile for t in tiles] != slots or (pixels is not None and sum(tiles) != pixels.shape[0]):
            raise ImageCountError(
                f"The images' expansions hold {slots} <|patch|> slots for {tiles} tiles of {per_tile} slots "
                f"each, and 'pixel_values' has {0 if pixels is None else pixels.shape[0]} tiles. Build the "
                "batch with vlm.prepare or the model's processor."
            )
        return tiles

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: (tile, row, col) of each slot, row and col on the tile's slot grid. **Tile 0 is
        the global view** (the whole image on one tile), which comes *last* in the sequence; the crops
        come first, tiles 1, 2, ... row-major on the canvas. An image of one tile is tile 0 alone."""
        return thumbnail_last_layouts(self.tiles_per_image(inputs), self._tile_grid())

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        return {"pixel_values": self.tiles_per_image(inputs)}

    # -- the sequence
    def lm_attention_mask(
        self,
        inputs: Mapping[str, torch.Tensor],
        inputs_embeds: Float[torch.Tensor, "batch pos d_model"],
        position_ids: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The masks ``Llama4TextModel.forward`` builds: causal (NoPE layers) and chunked (RoPE layers)."""
        kwargs = dict(
            config=self.text_config,
            inputs_embeds=inputs_embeds,
            attention_mask=inputs["attention_mask"].to(inputs_embeds.device),
            position_ids=position_ids,
        )
        chunked = create_chunked_causal_mask(**kwargs, **no_kv_cache(create_chunked_causal_mask))
        return {
            "full_attention": create_causal_mask(**kwargs, **no_kv_cache(create_causal_mask)),
            "chunked_attention": chunked,
        }


def llama4_attention_forward(
    bridge: torch.nn.Module,
    hidden_states: Float[torch.Tensor, "batch pos d_model"],
    position_embeddings: torch.Tensor,
    attention_mask: torch.Tensor | None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[Float[torch.Tensor, "batch pos d_model"], Float[torch.Tensor, "batch head query key"]]:
    """HF's ``Llama4TextAttention.forward`` with its eager attention (transformers 5.23), line for line,
    as the forward of transformer-lens's attention bridge around it, with the bridge's hook points
    fired in TransformerLens's places (see the module docstring)."""
    hf = bridge.original_component
    for setting in ("use_split_qkv_input", "use_attn_in", "use_attn_result"):
        if getattr(bridge.config, setting, False):
            raise NotImplementedError(f"Llama 4's attention hooks do not implement {setting}; leave it off.")
    hidden_states = bridge.hook_in(hidden_states)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, hf.head_dim)

    query_states = hf.q_proj(hidden_states).view(hidden_shape)
    key_states = hf.k_proj(hidden_states).view(*input_shape, -1, hf.head_dim)
    value_states = hf.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    if hf.use_rope:
        query_states, key_states = apply_rotary_emb(
            query_states, key_states, position_embeddings.to(query_states.device)
        )
    if hasattr(hf, "qk_norm"):
        query_states = hf.qk_norm(query_states)
        key_states = hf.qk_norm(key_states)
    if hf.attn_temperature_tuning and not hf.use_rope:
        past_seen_tokens = past_key_values.get_seq_length(hf.layer_idx) if past_key_values is not None else 0
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device) + past_seen_tokens
        floors = torch.floor((positions.float() + 1.0) / hf.floor_scale)
        attn_scales = torch.log1p(floors) * hf.attn_scale + 1.0
        attn_scales = attn_scales.view((1, input_shape[-1], 1, 1)).expand((*input_shape, 1, 1))
        query_states = (query_states * attn_scales).to(query_states.dtype)

    query_states = bridge.hook_rot_q(query_states.transpose(1, 2))
    key_states = bridge.hook_rot_k(key_states.transpose(1, 2))
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, hf.layer_idx)

    key_states = repeat_kv(key_states, hf.num_key_value_groups)
    value_states = repeat_kv(value_states, hf.num_key_value_groups)
    scores = torch.matmul(query_states, key_states.transpose(2, 3)) * hf.scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    scores = bridge.hook_attn_scores(scores)
    pattern = bridge.hook_pattern(torch.nn.functional.softmax(scores, dim=-1))
    output = torch.matmul(pattern, value_states).transpose(1, 2).contiguous()
    output = hf.o_proj(output.reshape(*input_shape, -1).contiguous())
    return bridge.hook_out(output), pattern
