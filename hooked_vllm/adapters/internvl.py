"""InternVL (``InternVLForConditionalGeneration``, transformers-native): InternViT on dynamic tiles ->
pixel shuffle -> MLP projector -> Qwen2 (InternVL3) or LLaMA-style language model.

- The image processor cuts each image into the canvas of tiles whose aspect is closest to the
  image's (``crop_to_patches``, ``min_patches``..``max_patches`` tiles) and, when that is more than one
  tile, appends a thumbnail (the whole image resized to one tile) after the crops. ``pixel_values``
  has one row per tile, ``[total tiles, 3, H, W]``, all images' tiles one after another.
- A prompt writes ``<IMG_CONTEXT>`` for an image (the processor's ``image_token``, what the
  checkpoints' chat templates write); the processor expands it to ``<img>``, ``image_seq_length``
  ``<IMG_CONTEXT>`` per tile, and ``</img>``. Only the ``<IMG_CONTEXT>`` slots are image: ``<img>``
  and ``</img>`` are text tokens of the structure (``special``), although HF's
  ``processor.image_token_ids`` lists them.
- Each tile gives a square grid of slots: the ViT's patch grid (CLS dropped) after HF's
  ``pixel_shuffle``, which merges 2x2 patches (``downsample_ratio`` 0.5) into one slot.
- HF's model does not know how many tiles an image has (it scatters all tiles' features in order);
  the processor writes ``image_seq_length`` slots per tile, so an image's tile count is its run of
  ``<IMG_CONTEXT>`` slots divided by the slots per tile.
- Positions and mask are the plain ones (``cumsum(mask) - 1``, 2-D causal); the text config maps
  to its own ``*ForCausalLM`` (``qwen2`` -> ``Qwen2ForCausalLM``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from jaxtyping import Float, Int

from hooked_vllm.adapters.base import (
    ImageSlots,
    VLMAdapter,
    pixel_shuffled_grid,
    selected_image_features,
    thumbnail_last_layouts,
)
from hooked_vllm.adapters.tokens import token_ids_with_spans
from hooked_vllm.errors import ImageCountError


class InternVLAdapter(VLMAdapter):
    family = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    #: InternVL3's chat template (ChatML; an image is ``<IMG_CONTEXT>\\n``), for processors without one.
    template = "<|im_start|>user\n{images}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

    # -- prompts
    @property
    def image_placeholder(self) -> str:
        """What a prompt writes for an image: the processor's ``<IMG_CONTEXT>``."""
        return self.processor.image_token

    def prompt_token_ids(self, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The prompt's tokens as the processor writes them: each ``<IMG_CONTEXT>`` between
        ``<img>`` and ``</img>`` (one slot per image: the caller drops the image tokens). The
        structure tokens are special tokens, so the text around them tokenizes as without them;
        they get empty spans."""
        ids, spans = token_ids_with_spans(self.tokenizer, prompt)
        start, end = self.processor.start_image_token_id, self.processor.end_image_token_id
        out_ids, out_spans = [], []
        for token, (first, last) in zip(ids, spans):
            if token == self.image_token_id:
                out_ids += [start, token, end]
                out_spans += [(first, first), (first, last), (last, last)]
            else:
                out_ids.append(token)
                out_spans.append((first, last))
        return out_ids, out_spans

    # -- the vision side
    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = selected_image_features(self.hf_model, inputs["pixel_values"])
        return features.flatten(0, 1)  # [tiles, slots per tile, d] -> tiles in order

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        layers = self.hf_model.model.vision_tower.encoder.layer
        return {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(layers)}

    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """How many images the batch holds: its runs of ``<IMG_CONTEXT>`` slots (``pixel_values``
        has one row per tile, not per image)."""
        if inputs.get("pixel_values") is None:
            return 0
        return len(self._slot_runs(inputs))

    def tiles_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Per image, in prompt order, its number of tiles (rows of ``pixel_values``): its slots
        divided by the slots per tile, as the processor wrote them."""
        per_tile = self.slots_per_tile
        runs = self._slot_runs(inputs)
        tiles = [run // per_tile for run in runs]
        pixels = inputs.get("pixel_values")
        if any(run % per_tile for run in runs) or (pixels is not None and sum(tiles) != pixels.shape[0]):
            raise ImageCountError(
                f"The images' <IMG_CONTEXT> runs hold {runs} slots, which is not a whole number of tiles "
                f"of {per_tile} slots each for the {0 if pixels is None else pixels.shape[0]} tiles in "
                "'pixel_values'. Build the batch with vlm.prepare or the model's processor."
            )
        return tiles

    def _slot_runs(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Lengths of the runs of consecutive image slots on real positions, item by item."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        slots = self.placeholder_mask(ids if ids.dim() == 2 else ids[None])
        if mask is not None:
            slots = slots & mask.reshape(slots.shape).bool()
        runs = []
        for row in slots.cpu().tolist():
            length = 0
            for flag in [*row, False]:
                if flag:
                    length += 1
                elif length:
                    runs.append(length)
                    length = 0
        return runs

    @property
    def slots_per_tile(self) -> int:
        """``<IMG_CONTEXT>`` slots per tile: (ViT patch grid side x ``downsample_ratio``) squared."""
        return int(self._tile_grid().shape[0])

    def _tile_grid(self) -> Int[torch.Tensor, "slots 2"]:
        """(row, col) of each slot of a tile on its shuffled grid, in HF's order: HF's own
        ``pixel_shuffle`` run on the patches' coordinates (each slot's row and col: those of the
        first patch it merges, divided by the merge factor)."""
        config = self.hf_model.config
        vision = config.vision_config
        side = int(vision.image_size[0]) // int(vision.patch_size[0])
        shuffle = self.hf_model.model.pixel_shuffle
        return pixel_shuffled_grid(
            side,
            lambda coords: shuffle(coords[None], scale_factor=config.downsample_ratio),
            round(1 / config.downsample_ratio),
        )

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: (tile, row, col) of each slot, row and col on the tile's slot grid (square,
        row-major). **Tile 0 is the thumbnail** (the whole image resized to one tile), which comes
        *last* in the sequence; the crops come first, tiles 1, 2, ... in HF's order (row-major on
        the canvas). An image of one tile has no thumbnail: its only tile, the whole image, is tile 0."""
        return thumbnail_last_layouts(self.tiles_per_image(inputs), self._tile_grid())

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        return {"pixel_values": self.tiles_per_image(inputs)}
