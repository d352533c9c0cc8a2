"""MiniCPM-V 4.6 (``MiniCPMV4_6ForConditionalGeneration``): a NaViT-style ViT with a 2x2
window-attention merger, a 2x2 merge + MLP per image slice, and Qwen3.5's hybrid language model.

- **Slices.** The image processor gives each image a *source view* (the whole image resized to at
  most ``scale_resolution`` pixels square, sides rounded to 4 patches) and, for an image larger than
  that, a ``rows x cols`` grid of *slices* of the image resized to the grid, row by row. Each view
  or slice of ``h x w`` patches (``target_sizes``) becomes ``h/4 x w/4`` slots: the ViT runs each
  slice on its own (``cu_seqlens``), its window-attention merger (after block ``insert_layer_id``)
  merges 2x2 patches, and the merger merges 2x2 again and projects to ``d_model``; both row-major.
- **Pixels.** ``pixel_values`` is one NaViT-packed row ``[1, channels, patch, columns]``: every
  slice of every image of the batch, patch after patch, along the last dimension (``h * w * patch``
  columns a slice). :attr:`image_input_dims` tells the batch to select images along that dimension;
  ``target_sizes`` holds one row per slice.
- **Prompt.** The processor writes each ``<unk_image>`` placeholder as
  ``<image_id>N</image_id>`` (N counts the prompt's images; ``use_image_id``), then
  ``<image>`` + the source view's slots + ``</image>``, then per row of slices ``<slice>`` + slots +
  ``</slice>`` per slice, a newline between rows. Only the ``<unk_image>`` slots receive the visual
  prefix; the markers, the id's digits and the newlines are structure: ``special``.
- **Layout** (:meth:`MiniCPMV4_6Adapter.image_layouts`): tile 0 the source view, tiles
  ``1 + r * cols + c`` the slices, row and col on each one's ``h/4 x w/4`` slot grid.
- **Language model:** Qwen3.5's (:mod:`hooked_vllm.adapters.qwen3_5`): Gated DeltaNet layers with no
  attention pattern, generation left-padded. HF's forward takes ``position_ids`` as given (1-D
  positions expanded to M-RoPE's three equal rows; with none, it counts padding): ours are
  ``cumsum(mask) - 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
from jaxtyping import Bool, Float, Int
from transformers import PretrainedConfig

from hooked_vllm.adapters.base import ImageSlots, VLMAdapter
from hooked_vllm.adapters.tokens import expansion_mask, real_token_rows
from hooked_vllm.errors import BatchFormatError, UnsupportedModelError


class MiniCPMV4_6Adapter(VLMAdapter):
    family = "minicpmv4_6"
    architectures: ClassVar[tuple[str, ...]] = ("MiniCPMV4_6ForConditionalGeneration",)
    view_class = None  # AutoModelForCausalLM: qwen3_5_text -> Qwen3_5ForCausalLM
    min_transformers = "5.23"  # the family is new in 5.23
    vision_input_names = ("target_sizes",)
    image_input_names = ("pixel_values", "target_sizes")
    image_input_dims: ClassVar[dict[str, int]] = {"pixel_values": -1}
    image_placeholder = "<unk_image>"
    template = "<|im_start|>user\n{images}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

    # -- tokens
    def _token_id(self, name: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(str(getattr(self.processor, name))))

    @classmethod
    def check_config(cls, config: PretrainedConfig) -> None:
        """Refuse ``downsample_mode="4x"`` (slots of ``h/2 x w/2``): measured in ``"16x"`` only."""
        if config.downsample_mode != "16x":
            raise UnsupportedModelError(
                f"MiniCPM-V 4.6 with downsample_mode={config.downsample_mode!r} is not supported "
                "(measured with '16x' only): load it with downsample_mode='16x'."
            )

    def _check_processor(self) -> None:
        mode = self.processor.image_processor.downsample_mode
        if mode != "16x":
            raise UnsupportedModelError(
                f"The image processor's downsample_mode is {mode!r}, the model's '16x': its prompts "
                "would have the wrong slot counts. Load the processor with downsample_mode='16x'."
            )

    # -- where each image's text is
    def _blocks(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``[start, end)`` of each image's expansion in one row of token ids: its
        ``<image_id>N</image_id>`` (if any), ``<image>...</image>`` and the ``<slice>...</slice>``
        rows after it, with the newlines between them."""
        id_start, id_end = self._token_id("image_id_start_token"), self._token_id("image_id_end_token")
        view_start, view_end = self._token_id("image_start_token"), self._token_id("image_end_token")
        slice_start, slice_end = self._token_id("slice_start_token"), self._token_id("slice_end_token")
        blocks, pos, n = [], 0, len(tokens)
        while pos < n:
            start = pos
            if tokens[pos] == id_start and id_end in tokens[pos:]:
                pos = tokens.index(id_end, pos) + 1
            if pos >= n or tokens[pos] != view_start or view_end not in tokens[pos:]:
                pos = start + 1
                continue
            pos = tokens.index(view_end, pos) + 1
            while pos < n:  # its slices: <slice>...</slice>, one newline token between rows
                row_break = tokens[pos - 1] == slice_end and pos + 1 < n and tokens[pos + 1] == slice_start
                at = pos + 1 if row_break else pos
                if tokens[at] != slice_start or slice_end not in tokens[at:]:
                    break
                pos = tokens.index(slice_end, at) + 1
            blocks.append((start, pos))
        return blocks

    def image_text_mask(self, input_ids: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """The text the processor writes for each image: its id, the markers, the slots and the
        newlines between rows of slices."""
        return expansion_mask(input_ids, self.placeholder_mask, self._blocks)

    def _slices_per_image(self, inputs: Mapping[str, torch.Tensor]) -> list[int]:
        """Per image, in batch order: its source view and slices (``<image>`` and ``<slice>`` runs)."""
        starts = {self._token_id("image_start_token"), self._token_id("slice_start_token")}
        return [
            sum(1 for token in tokens[first:last] if token in starts)
            for tokens in real_token_rows(inputs)
            for first, last in self._blocks(tokens)
        ]

    # -- the vision side
    def n_images(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """Images in the batch: their ``<image>`` markers on real positions."""
        if inputs.get("pixel_values") is None:
            return 0
        return len(self._slices_per_image(inputs))

    def _slice_sizes(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[int], list[list[int]]]:
        """Per image its number of units (view + slices), and each unit's ``(h, w)`` in patches;
        refused in one line where ``target_sizes`` does not match the prompts."""
        self._check_processor()
        slices, sizes = self._slices_per_image(inputs), inputs["target_sizes"]
        if sum(slices) != sizes.shape[0]:
            raise BatchFormatError(
                f"The prompts hold {sum(slices)} image views and slices but target_sizes has "
                f"{sizes.shape[0]} rows: pass the processor's input_ids with its target_sizes."
            )
        return slices, sizes.tolist()

    def image_input_rows(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """``target_sizes``: one row per view or slice; ``pixel_values``: ``h * w * patch`` columns each."""
        slices, sizes = self._slice_sizes(inputs)
        patch = int(inputs["pixel_values"].shape[-2])
        columns = [h * w * patch for h, w in sizes]
        firsts = [sum(slices[:i]) for i in range(len(slices))]
        return {
            "target_sizes": slices,
            "pixel_values": [sum(columns[f : f + k]) for f, k in zip(firsts, slices)],
        }

    def visual_prefix(self, inputs: Mapping[str, torch.Tensor]) -> Float[torch.Tensor, "n_slots d_model"]:
        features = self.hf_model.model.get_image_features(
            inputs["pixel_values"][:1], inputs["target_sizes"]
        ).pooler_output
        return torch.cat(list(features))

    def image_layouts(self, inputs: Mapping[str, torch.Tensor]) -> list[ImageSlots]:
        """Per image: tile 0 the source view, tiles ``1 + r * cols + c`` its slices (row-major, as the
        processor writes them); row and col on each one's ``h/4 x w/4`` slot grid."""
        slices, sizes = self._slice_sizes(inputs)
        layouts, first = [], 0
        for count in slices:
            grids = []
            for tile, (h, w) in enumerate(sizes[first : first + count]):
                grids.append(ImageSlots.rows_by_cols(h // 4, w // 4, tile).grid)
            layouts.append(ImageSlots(torch.cat(grids)))
            first += count
        return layouts

    def vision_hook_sites(self) -> dict[str, torch.nn.Module]:
        tower = self.hf_model.model.vision_tower
        sites = {f"vision.blocks.{i}.hook_resid_post": layer for i, layer in enumerate(tower.encoder.layers)}
        sites["vision.hook_window_merger"] = tower.vit_merger
        return sites
