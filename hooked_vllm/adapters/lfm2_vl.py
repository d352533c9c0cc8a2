"""LFM2-VL (``Lfm2VlForConditionalGeneration``): SigLIP2 NaFlex tower on image tiles -> pixel
unshuffle + MLP projector -> LFM2, a **hybrid** language model.

- **Language model.** Most LFM2 layers (``layer_types[l] == "conv"``) mix positions with a gated
  short convolution (``in_proj`` to ``B, C, x``; ``C * causal_conv1d(B * x)``; ``out_proj``), not
  attention: they have no pattern (``blocks.{l}.conv.*`` hook points, no ``blocks.{l}.attn``), and
  :attr:`~hooked_vllm.adapters.base.VLMAdapter.attention_layers` names the others. HF zeroes padded
  positions before each convolution (``apply_mask_to_padding_states``), so left padding never enters
  a real position's window: an item alone equals its batched self. Generation keeps each conv
  layer's last ``conv_L_cache`` inputs in HF's cache: a right-padded item would run its padding into
  them, so :attr:`decodes_left_padded`. The attention layers have q/k RMSNorms and RoPE; positions
  ``cumsum(mask) - 1``. The bridge is booted on HF's own ``Lfm2ForCausalLM`` around the VLM's text
  model (transformer-lens's ``lfm2`` adapter).
- **Tiles.** The image processor keeps an image whole when it fits ``max_image_tokens`` (one tile:
  the image resized to multiples of ``encoder_patch_size * downsample_factor``), else cuts it into
  ``rows x cols`` tiles of ``tile_size`` pixels, row by row, and (``use_thumbnail``) adds the whole
  image resized, the thumbnail. Each tile is one row of ``pixel_values`` / ``spatial_shapes`` /
  ``pixel_attention_mask`` (patches flattened, NaFlex): ``spatial_shapes`` is its patch grid, and the
  projector's pixel unshuffle turns ``h x w`` patches into ``h/f x w/f`` slots, row-major.
- **Prompt.** The processor expands each ``<image>`` into ``<|image_start|>``, then per tile
  ``<|img_row_i_col_j|>`` + its slots, then ``<|img_thumbnail|>`` + the thumbnail's slots, then
  ``<|image_end|>`` (a one-tile image: its slots alone between the two). Only the ``<image>`` slots
  receive the visual prefix; the markers are text the model embeds: structure, so ``special``.
- **Layout** (:meth:`Lfm2VlAdapter.image_layouts`): as Idefics3's, tile 0 is the whole image (the
  thumbnail, or the one tile), tile ``1 + (i-1) * cols + (j-1)`` the crop at ``<|img_row_i_col_j|>``.
- Inputs processed with ``use_image_special_tokens=False`` (no markers: tiles cannot be told apart)
  are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from jaxtyping import Bool, Float, Int

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter
from hooked_vllm.adapters.tokens import expansion_mask, marked_runs, marker_blocks, real_token_rows
from hooked_vllm.errors import BatchFormatError

_ROW_COL = re.compile(r"<\|img_row_(\d+)_col_(\d+)\|>")


class Lfm2VlAdapter(VLMAdapter):
    family = "lfm2_vl"
    architectures = ("Lfm2VlForConditionalGeneration",)
    images_per_prompt = True  # the processor takes each prompt's images as a list
    vision_input_names = ("spatial_shapes", "pixel_attention_mask")
    image_input_names = ("pixel_values", "spatial_shapes", "pixel_attention_mask")
    min_transformers = "5.23"  # measured on 5.23 only
    mixer_without_pattern = "conv"  # blocks.{l}.conv: the short convolution (transformer-lens's name)

    # -- tokens
    def _token_id(self, name: str, default: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(getattr(self.processor, name, None) or default))

    @property
    def image_start_id(self) -> int:
        return self._token_id("image_start_token", "<|image_start|>")

    @property
    def image_end_id(self) -> int:
        return self._token_id("image_end_token", "<|image_end|>")

    @property
    def thumbnail_id(self) -> int:
        return self._token_id("image_thumbnail_token", "<|img_thumbnail|>")

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """Each image's expansion, ``<|image_start|>`` to ``<|image_end|>``: slots and markers."""
        # placeholder_mask: a prompt's own <image> too, before the processor expands it
        return expansion_mask(input_ids, self.placeholder_mask, self._blocks)

    def _blocks(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's expansion in one row of token ids."""
        return marker_blocks(tokens, self.image_start_id, self.image_end_id)

    def _expansions(self, inputs: Mapping[str, torch.Tensor]) -> list[list[int]]:
        """The token ids of every image's expansion, in batch order (real tokens only)."""
        ids = inputs["input_ids"]
        ids = ids if ids.dim() == 2 else ids[None]
        real = inputs.get("attention_mask", torch.ones_like(ids)).reshape(ids.shape).bool()
        expansions = []
        for tokens in real_token_rows(inputs):
            expansions += [tokens[start:end] for start, end in self._blocks(tokens)]
        if not expansions and bool((self.placeholder_mask(ids) & real).any()):
            raise BatchFormatError(
                "LFM2-VL image slots without <|image_start|>/<|image_end|> markers (processed with "
                "use_image_special_tokens=False): its tiles cannot be told apart. Process with the "
                "default use_image_special_tokens=True (vlm.prepare does)."
            )
        return expansions

    def _runs(self, block: list[int]) -> list[tuple[int, int]]:
        """``(marker token, slots)`` of each tile of one image's expansion, in sequence order: each
        run of ``<image>`` is a tile, named by the token before it."""
        return marked_runs(block, self.image_token_id)

    # -- the vision side
    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Images in the batch: their ``<|image_start|>`` markers."""
        if inputs.get("pixel_values") is None:
            return 0
        return len(self._expansions(inputs))

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """How many tiles (rows of ``pixel_values``) each image has, the thumbnail included."""
        return [len(self._runs(block)) for block in self._expansions(inputs)]

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        tiles = self.tiles_per_image(inputs) if inputs.get("pixel_values") is not None else []
        return {name: tiles for name in self.image_input_names if name in inputs}

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            spatial_shapes=inputs["spatial_shapes"],
            pixel_attention_mask=inputs["pixel_attention_mask"],
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: each slot's ``(tile, row, col)``, tile 0 the thumbnail (or the one tile), tiles
        ``1 + (i-1) * cols + (j-1)`` the crop at ``<|img_row_i_col_j|>``; row and col on the tile's
        unshuffled patch grid (``spatial_shapes // downsample_factor``), row-major."""
        factor = int(self.hf_model.config.downsample_factor)
        shapes = iter((inputs["spatial_shapes"] // factor).tolist())
        layouts = []
        for block in self._expansions(inputs):
            runs = self._runs(block)
            markers = self.tokenizer.convert_ids_to_tokens([marker for marker, _ in runs])
            cells = [_ROW_COL.fullmatch(marker or "") for marker in markers]
            n_cols = max((int(cell.group(2)) for cell in cells if cell), default=1)
            grids = []
            for (_, n), cell in zip(runs, cells):
                rows, cols = next(shapes)
                if rows * cols != n:
                    raise BatchFormatError(
                        f"An LFM2-VL tile has {n} image slots but its spatial_shapes give {rows}x{cols}: "
                        "input_ids and the image tensors do not belong together. Process them in one call."
                    )
                tile = (int(cell.group(1)) - 1) * n_cols + int(cell.group(2)) if cell else 0
                k = torch.arange(n)
                grids.append(torch.stack([torch.full_like(k, tile), k // cols, k % cols], dim=-1))
            layouts.append(ImageSlots(torch.cat(grids)))
        return layouts

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.model.vision_tower.encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}
