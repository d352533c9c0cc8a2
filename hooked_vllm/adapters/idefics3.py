"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``):
SigLIP-style tower on image tiles -> pixel shuffle + linear connector -> LLaMA language model.

- **Tiles.** The image processor resizes an image's longest edge to ``size["longest_edge"]``, rounds
  both sides up to whole tiles of ``max_image_size`` pixels and cuts them into ``rows x cols`` tiles,
  row by row; the whole image resized to one tile (the *global image*) comes after them. An image
  that fits one tile is the global image alone. Each tile's ``side x side`` patch grid is pixel-shuffled
  (``scale_factor`` s) into ``side/s x side/s`` slots, row-major: slot k covers the s x s patches
  of block row ``k // (side/s)``, block column ``k % (side/s)``.
- **Prompt.** The processor expands each ``<image>`` into, per tile,
  ``<fake_token_around_image><row_i_col_j>`` + the tile's slots (``<image>`` each), a newline after
  each row of tiles, then ``\\n<fake_token_around_image><global-img>`` + the global image's slots +
  ``<fake_token_around_image>``. Only the ``<image>`` slots receive the visual prefix; the
  ``<fake_token_around_image>``, ``<row_i_col_j>``, ``<global-img>`` and newline tokens are text the
  language model embeds as text: structure, so ``special``, not ``image``. (Idefics3's processor, asked
  for ``mm_token_type_ids``, marks the whole expansion, structure tokens included, as image; SmolVLM's
  marks the slots only. The image mask here is the slots, for both.)
- **Layout** (:meth:`Idefics3Adapter.image_layouts`): per image, slots in sequence order with
  ``(tile, row, col)``: tile 0 is the global image (the whole image, as LLaVA-NeXT's base view is tile 0,
  although it comes *last* in the sequence), tiles ``1 + (i-1) * cols + (j-1)`` the crop at
  ``<row_i_col_j>`` (row-major, as the processor writes them); row and col on the tile's shuffled grid.
- **Pixels.** The processor gives ``pixel_values`` ``[items, most tiles of an item, 3, H, W]`` (every
  tile of every image of the item, zero-padded to the item with the most) and ``pixel_attention_mask``
  ``[items, most tiles, H, W]``. :meth:`Idefics3Adapter.normalize_inputs` re-lays both out per image,
  ``[images, most tiles of an image, ...]`` (the tiles of each image, counted from its ``<image>`` runs
  in ``input_ids``), so that a sub-batch takes its images' rows.
- **All-zero tiles are dropped, as HF drops them.** HF's ``Idefics3Model.get_image_features`` (and
  SmolVLM's, the same code) keeps only the tiles with a nonzero value:
  ``real_images_inds = (pixel_values == 0.0).sum(dim=(-1, -2, -3)) != nb_values_per_image``. Meant for
  the zero padding tiles, it also drops a *real* tile whose normalised pixels are all exactly 0. We
  call that same function, so we drop exactly what HF drops (our numbers must be HF's). With the
  processors' normalisation (mean 0.5, std 0.5) no 8-bit image gives such a tile (0 is pixel value
  127.5); a processor without normalisation (black tiles) or hand-made ``pixel_values`` can. The image
  then yields fewer features than it has slots: HF's forward raises, and so does ours
  (:class:`~hooked_vllm.errors.ImageCountError`), rather than shifting features into the wrong slots.
- **Positions and mask:** ``cumsum(mask) - 1`` and the 2-D padding mask, as LLaMA in HF's forward.
- **SmolVLM's processor and ``num2words``.** ``transformers.models.smolvlm.processing_smolvlm`` imports
  ``num2words`` only if installed (it spells a video's frame count) and ``SmolVLMProcessor.__init__``
  raises ``ImportError`` when it is missing, images or not: no SmolVLM checkpoint would load. This
  module puts a stand-in there (only where ``num2words`` is missing) that raises the same advice when a
  video prompt needs it, so image prompts work without the package.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from transformers.models.smolvlm import processing_smolvlm

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter
from hooked_vllm.adapters.tokens import expansion_mask, marked_runs, real_token_rows


def _num2words_missing(number: int, *args: Any, **kwargs: Any) -> str:
    raise ImportError(
        "Package `num2words` is required for SmolVLM's video prompts (it spells the frame count). "
        "Install it with `pip install num2words`."
    )


if processing_smolvlm.num2words is None:  # SmolVLMProcessor refuses to exist without it
    processing_smolvlm.num2words = _num2words_missing

_ROW_COL = re.compile(r"<row_(\d+)_col_(\d+)>")


class Idefics3Adapter(VLMAdapter):
    family = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    images_per_prompt = True  # SmolVLM's processor takes each prompt's images as a list
    min_transformers = "5.22"  # measured: 5.20 does not drop all-zero tiles as 5.22 does
    vision_input_names = ("pixel_attention_mask",)
    image_input_names = ("pixel_values", "pixel_attention_mask")
    #: Idefics3's and SmolVLM's chat format, where the processor has no chat template
    template = "User:{images}{instruction}<end_of_utterance>\nAssistant:"

    # -- tokens
    def _token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    @property
    def fake_image_token_id(self) -> int:
        """``<fake_token_around_image>``: opens each tile and closes the image."""
        return self._token_id(getattr(self.processor, "fake_image_token", "<fake_token_around_image>"))

    @property
    def global_image_token_id(self) -> int:
        """``<global-img>``: marks the global image, the image's last block."""
        processor = self.processor
        token = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", None)
        return self._token_id(token or "<global-img>")

    # -- prompts and processing

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The text the processor writes for each image, from its first ``<fake_token_around_image>``
        to the one closing its global image: the slots and the structure tokens around them."""
        # placeholder_mask: a prompt's own <image> too, before the processor expands it
        return expansion_mask(input_ids, self.placeholder_mask, self._blocks)

    def _blocks(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's expansion in one row of token ids."""
        fake, glob = self.fake_image_token_id, self.global_image_token_id
        blocks, start, seen_global = [], None, False
        for pos, token in enumerate(tokens):
            if token == fake and start is None:
                start = pos
            elif token == glob and start is not None:
                seen_global = True
            elif token == fake and seen_global:
                blocks.append((start, pos + 1))
                start, seen_global = None, False
        return blocks

    def _expansions_of(self, inputs: Mapping[str, torch.Tensor]) -> list[list[list[int]]]:
        """Per item, the token ids of each of its images' expansions (real tokens only)."""
        return [
            [tokens[start:end] for start, end in self._blocks(tokens)] for tokens in real_token_rows(inputs)
        ]

    def normalize_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``pixel_values`` and ``pixel_attention_mask`` one image per row (the processor's are one item
        per row)."""
        pixels = inputs.get("pixel_values")
        if pixels is None or pixels.dim() != 5:
            return inputs
        tiles = [[self._tiles_of(block) for block in item] for item in self._expansions_of(inputs)]
        masks = inputs.get("pixel_attention_mask")
        present = (masks if masks is not None else pixels).flatten(2).ne(0).any(-1)  # [rows, tiles]
        per_image = [n for item in tiles for n in item]
        if len(per_image) == pixels.shape[0] and all(
            int(present[i].sum()) == n for i, n in enumerate(per_image)
        ):
            return inputs  # one image per row already
        if pixels.shape[0] != len(tiles) or any(
            int(present[i].sum()) != sum(item) for i, item in enumerate(tiles)
        ):
            return inputs  # not the processor's layout: left to HF's checks
        inputs = dict(inputs)
        inputs["pixel_values"] = _per_image(pixels, tiles)
        if masks is not None:
            inputs["pixel_attention_mask"] = _per_image(masks, tiles)
        return inputs

    def _tiles_of(self, block: list[int]) -> int:
        """How many tiles (the global image included) one image's expansion holds."""
        image = self.image_token_id
        return sum(1 for a, b in zip([None, *block], block) if b == image and a != image)

    # -- the vision side
    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Images in the batch: its ``<global-img>`` markers (every image ends with one)."""
        if inputs.get("pixel_values") is None:
            return 0
        ids = inputs["input_ids"]
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        return int(((ids == self.global_image_token_id) & real).sum())

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs.get("pixel_attention_mask")
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: each slot's ``(tile, row, col)``, tile 0 the global image and tiles
        ``1 + (i-1) * cols + (j-1)`` the crop at ``<row_i_col_j>``; row and col on the tile's
        pixel-shuffled grid, row-major."""
        return [self._layout_of(block) for item in self._expansions_of(inputs) for block in item]

    def _layout_of(self, block: list[int]) -> ImageSlots:
        """One image's slots from its expansion: each run of ``<image>`` is a tile, named by the
        token before it (``<row_i_col_j>`` or ``<global-img>``)."""
        glob = self.global_image_token_id
        runs = marked_runs(block, self.image_token_id)  # (marker token, slots) per tile, in sequence order
        markers = self.tokenizer.convert_ids_to_tokens([m for m, _ in runs if m != glob])
        cells = [_ROW_COL.fullmatch(marker or "") for marker in markers]
        if all(cells):
            n_cols = max((int(cell.group(2)) for cell in cells), default=1)
            crops = iter([(int(c.group(1)) - 1) * n_cols + int(c.group(2)) for c in cells])
        else:  # no row/column markers to read: crops numbered in sequence order
            crops = iter(range(1, len(cells) + 1))
        grids = []
        for marker, n in runs:
            tile = 0 if marker == glob else next(crops)
            side = int(round(n**0.5))
            k = torch.arange(n)
            rows, cols = (k // side, k % side) if side * side == n else (torch.zeros_like(k), k)
            grids.append(torch.stack([torch.full_like(k, tile), rows, cols], dim=-1))
        return ImageSlots(torch.cat(grids))

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.model.vision_model.encoder.layers
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}


def _per_image(tensor: torch.Tensor, tiles: list[list[int]]) -> torch.Tensor:
    """``[items, tiles, ...]`` (each item's images' tiles in turn) -> ``[images, most tiles, ...]``,
    zero-padded."""
    most = max((n for item in tiles for n in item), default=0)
    rows = []
    for row, item in enumerate(tiles):
        start = 0
        for n in item:
            image = tensor.new_zeros((most, *tensor.shape[2:]))
            image[:n] = tensor[row, start : start + n]
            rows.append(image)
            start += n
    return torch.stack(rows) if rows else tensor[:0]
