"""Batches that know each position's modality.

A :class:`VLMBatch` carries the processor's tensors plus three disjoint boolean masks over
``[batch, pos]``:

- ``image``: the image-patch positions (the placeholders the visual prefix fills with patches);
- ``text``: the user's instruction tokens;
- ``special``: everything else: BOS, template words (``USER:``, ``ASSISTANT:``), image structure
  tokens (LLaVA-NeXT's row newlines, Gemma 3's begin/end of image), padding.

``image_slots[item]`` lists the item's images and, per placeholder slot, its tile, row and column on
the image (:class:`~hooked_vllm.adapters.base.ImageSlots`). Positions are the family's (counted
over real tokens, ``[3, batch, pos]`` for M-RoPE), so an item's activations do not depend on its
batch-mates' lengths or on the padding side.

Example:
    >>> batch = vlm.prepare(images=[img], prompts=["Describe the image."])  # doctest: +SKIP
    >>> batch.ranges("image")[0]  # doctest: +SKIP
    [(5, 581)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool, Int

from hooked_vllm.adapters.base import ImageSlots, positions_from_mask  # noqa: F401 (re-exported)
from hooked_vllm.errors import BatchFormatError, HookedVLMError, ImageCountError, MissingImageError

if TYPE_CHECKING:
    from hooked_vllm.adapters import VLMAdapter

Modality = Literal["image", "text", "special"]
PositionIds = Int[torch.Tensor, "batch pos"] | Int[torch.Tensor, "3 batch pos"]

#: What :meth:`HookedVLM.prepare` raises for one item it cannot take: HF processors refuse images
#: and text with ``ValueError``/``TypeError`` (an aspect ratio over 200, text no tokenizer reads), and
#: hooked-vllm's own checks with a :class:`~hooked_vllm.errors.HookedVLMError`.
PREPARE_ERRORS = (ValueError, TypeError, HookedVLMError)


@dataclass
class VLMBatch:
    """Model inputs with per-position modality masks.

    ``inputs`` holds the processor's tensors (``input_ids``, ``attention_mask``, ``pixel_values``
    and the family's others: ``image_sizes``, ``image_grid_thw``, ``token_type_ids``...).
    """

    inputs: dict[str, torch.Tensor]
    image_mask: Bool[torch.Tensor, "batch pos"]
    text_mask: Bool[torch.Tensor, "batch pos"]
    special_mask: Bool[torch.Tensor, "batch pos"]
    position_ids: PositionIds
    prompts: list[str] | None = None
    instructions: list[str] | None = None
    #: True when ``text`` is exactly the instruction; False when it was inferred (raw processor
    #: output: ``text`` is then every non-image, non-special token, template words included).
    exact_text_spans: bool = field(default=True)
    #: per item, its images' placeholder slots in sequence order
    image_slots: list[list[ImageSlots]] = field(default_factory=list)
    #: inputs with one entry per token, moved with the padding
    token_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    #: per-image inputs: rows along dim 0 of each image (the adapter's ``image_input_rows``)
    image_rows: dict[str, list[int]] = field(default_factory=dict)
    #: per-image inputs holding indices into another's units (the adapter's ``image_index_inputs``)
    image_indices: dict[str, str] = field(default_factory=dict)
    #: per-image inputs whose images lie along another dimension than 0 (the adapter's ``image_input_dims``)
    image_dims: dict[str, int] = field(default_factory=dict)

    @property
    def input_ids(self) -> Int[torch.Tensor, "batch pos"]:
        return self.inputs["input_ids"]

    @property
    def attention_mask(self) -> Int[torch.Tensor, "batch pos"]:
        return self.inputs["attention_mask"]

    @property
    def pixel_values(self) -> torch.Tensor | None:
        return self.inputs.get("pixel_values")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    # Where TransformerLens code treats its input as a token tensor (``transformer_lens.patching``,
    # ``tokens.shape[-1]``, ``tokens[:2]``), a batch answers as its ``input_ids`` would.
    @property
    def shape(self) -> torch.Size:
        """``input_ids``'s shape, ``[batch, pos]``."""
        return self.input_ids.shape

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def __getitem__(self, index: int | slice | Sequence[int]) -> VLMBatch:
        """Items ``index`` as a batch (an int keeps its batch dimension, as ``tokens[i:i+1]``)."""
        if isinstance(index, int):
            index = [range(len(self))[index]]
        elif isinstance(index, torch.Tensor):
            index = index.tolist()
        return self.select(index)

    def mask(self, modality: Modality) -> Bool[torch.Tensor, "batch pos"]:
        """The boolean mask of ``"image"``, ``"text"`` or ``"special"`` positions."""
        masks = {"image": self.image_mask, "text": self.text_mask, "special": self.special_mask}
        if modality not in masks:
            raise KeyError(f"Unknown modality {modality!r}; expected one of {sorted(masks)}.")
        return masks[modality]

    def ranges(self, modality: Modality) -> list[list[tuple[int, int]]]:
        """Per item, the ``[start, end)`` runs of positions of ``modality``."""
        runs: list[list[tuple[int, int]]] = []
        for row in self.mask(modality).cpu().tolist():
            item, start = [], None
            for pos, flag in enumerate([*row, False]):
                if flag and start is None:
                    start = pos
                elif not flag and start is not None:
                    item.append((start, pos))
                    start = None
            runs.append(item)
        return runs

    @property
    def last_positions(self) -> Int[torch.Tensor, " batch"]:
        """Index of each item's last real (non-padding) token."""
        pos = torch.arange(self.input_ids.shape[1], device=self.input_ids.device)
        return torch.where(self.attention_mask.bool(), pos, -1).amax(-1)

    def to(self, device: torch.device | str) -> VLMBatch:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return replace(
            self,
            inputs=moved,
            image_mask=self.image_mask.to(device),
            text_mask=self.text_mask.to(device),
            special_mask=self.special_mask.to(device),
            position_ids=self.position_ids.to(device),
        )

    def pin_memory(self) -> VLMBatch:
        """The processor's tensors in page-locked memory (DataLoader calls this with
        ``pin_memory=True``), for faster host-to-GPU copies; the masks stay as they are."""
        pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return replace(self, inputs=pinned)

    def select(self, index: slice | Sequence[int]) -> VLMBatch:
        """The sub-batch of items ``index``, with their images."""
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        rows = torch.tensor(idx, dtype=torch.long)

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[rows.to(t.device)]

        image_counts = [len(images) for images in self.image_slots]
        first_image = [sum(image_counts[:i]) for i in range(len(image_counts))]
        images = [first_image[i] + j for i in idx for j in range(image_counts[i])] if image_counts else []
        inputs = {}
        for name, value in self.inputs.items():
            if name in self.image_rows:
                if images:  # a selection without images is a text-only batch: no empty pixel tensors
                    dim = self.image_dims.get(name, 0)
                    inputs[name] = _rows_of_images(value, self.image_rows[name], images, dim)
                    if name in self.image_indices:
                        indexed = self.image_indices[name]
                        units = self.image_rows[indexed]
                        per_row = math.prod(self.inputs[indexed].shape[1:-1])
                        inputs[name] = _rebased(
                            inputs[name], [self.image_rows[name][i] for i in images], units, per_row, images
                        )
            else:
                inputs[name] = pick(value)
        return replace(
            self,
            inputs=inputs,
            image_mask=pick(self.image_mask),
            text_mask=pick(self.text_mask),
            special_mask=pick(self.special_mask),
            position_ids=self.position_ids[..., rows.to(self.position_ids.device), :],
            prompts=[self.prompts[i] for i in idx] if self.prompts else None,
            instructions=[self.instructions[i] for i in idx] if self.instructions else None,
            image_slots=[self.image_slots[i] for i in idx] if self.image_slots else [],
            image_rows={name: [counts[i] for i in images] for name, counts in self.image_rows.items()},
        )

    def left_padded(self) -> VLMBatch:
        """The same batch with every row's padding moved to the left (what generation needs).

        Results are unchanged: positions move with their tokens.
        """
        shifts = (self.input_ids.shape[1] - 1 - self.last_positions).tolist()
        if not any(shifts):
            return self

        def roll(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([row.roll(s, -1) for row, s in zip(t.unbind(-2), shifts)], dim=-2)

        inputs = {k: roll(v) if k in self.token_inputs else v for k, v in self.inputs.items()}
        return replace(
            self,
            inputs=inputs,
            image_mask=roll(self.image_mask),
            text_mask=roll(self.text_mask),
            special_mask=roll(self.special_mask),
            position_ids=roll(self.position_ids),
        )


def _rows_of_images(
    tensor: torch.Tensor, rows_per_image: list[int], images: list[int], dim: int = 0
) -> torch.Tensor:
    """The rows along ``dim`` of ``images`` in a per-image tensor whose image i has
    ``rows_per_image[i]`` rows there."""
    starts = [sum(rows_per_image[:i]) for i in range(len(rows_per_image))]
    index = [r for i in images for r in range(starts[i], starts[i] + rows_per_image[i])]
    return tensor.index_select(dim, torch.tensor(index, dtype=torch.long, device=tensor.device))


def _rebased(
    indices: torch.Tensor, rows: list[int], units: list[int], per_unit: int, images: list[int]
) -> torch.Tensor:
    """The selected ``images``' index rows (``rows[k]`` for the k-th of them, in order), re-based from
    offsets over all images (image i owning ``units[i] * per_unit`` entries of the indexed input) to
    offsets over the selected ones; -1 stays -1."""
    sizes = [count * per_unit for count in units]
    old = [sum(sizes[:i]) for i in range(len(sizes))]
    pieces, start, new = [], 0, 0
    for k, i in enumerate(images):
        block = indices[start : start + rows[k]]
        pieces.append(torch.where(block >= 0, block - old[i] + new, block))
        start, new = start + rows[k], new + sizes[i]
    return torch.cat(pieces)


NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
BatchLike = VLMBatch | Mapping[str, torch.Tensor]
#: what the model runs on: image + text batches, or text alone as TransformerLens takes it
ModelInput = VLMBatch | Mapping[str, torch.Tensor] | str | list[str] | torch.Tensor


def build_batch(
    adapter: VLMAdapter,
    inputs: Mapping[str, torch.Tensor],
    prompts: Sequence[str] | None = None,
    instruction_spans: Sequence[tuple[int, int]] | None = None,
    instructions: Sequence[str] | None = None,
) -> VLMBatch:
    """Wrap processor outputs in a :class:`VLMBatch`, computing the modality masks.

    With ``prompts`` and ``instruction_spans`` (what :meth:`HookedVLM.prepare` passes), ``text`` is
    exactly the instruction's tokens. Without them (raw processor output), ``text`` is every real
    token that is neither an image placeholder nor a special token of the tokenizer.
    """
    if "input_ids" not in inputs:
        raise BatchFormatError(
            f"The batch has no 'input_ids' (keys: {sorted(inputs)}). Pass the output of the model's "
            "processor or of vlm.prepare(images=..., prompts=...)."
        )
    _refuse_videos(adapter, inputs)
    tensors = adapter.normalize_inputs({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
    input_ids = tensors["input_ids"]
    if input_ids.dim() == 1:
        tensors = {k: v.unsqueeze(0) if k in adapter.token_input_names else v for k, v in tensors.items()}
        input_ids = tensors["input_ids"]
    attention_mask = tensors.setdefault("attention_mask", torch.ones_like(input_ids))
    real = attention_mask.bool()
    placeholders = adapter.placeholder_mask(input_ids) & real
    image_slots, image_mask = _assign_images(adapter, tensors, placeholders)
    image_text = adapter.image_text_mask(input_ids) & real

    if prompts is not None and instruction_spans is not None:
        text_mask = _instruction_mask(adapter, input_ids, real, image_text, prompts, instruction_spans)
        exact = True
    else:
        special_ids = torch.tensor(sorted(adapter.tokenizer.all_special_ids), device=input_ids.device)
        text_mask = real & ~image_text & ~torch.isin(input_ids, special_ids)
        exact = False
    return VLMBatch(
        inputs=tensors,
        image_mask=image_mask,
        text_mask=text_mask,
        special_mask=~(image_mask | text_mask),
        position_ids=adapter.position_ids(tensors),
        prompts=list(prompts) if prompts is not None else None,
        instructions=list(instructions) if instructions is not None else None,
        exact_text_spans=exact,
        image_slots=image_slots,
        token_inputs=tuple(name for name in adapter.token_input_names if name in tensors),
        image_rows=adapter.image_input_rows(tensors) if image_slots else {},
        image_indices={k: v for k, v in adapter.image_index_inputs.items() if k in tensors and image_slots},
        image_dims={k: v for k, v in adapter.image_input_dims.items() if k in tensors and image_slots},
    )


def _refuse_videos(adapter: VLMAdapter, inputs: Mapping[str, torch.Tensor]) -> None:
    """Videos are not supported: refused, rather than their placeholders run as text."""
    video_keys = sorted(k for k in inputs if "video" in k)
    ids = inputs["input_ids"]
    video_ids = adapter.video_token_ids
    if video_keys or (video_ids and bool(torch.isin(ids, torch.tensor(video_ids, device=ids.device)).any())):
        raise BatchFormatError(
            f"The batch holds a video ({', '.join(video_keys) or 'video placeholder tokens'}); hooked-vllm "
            "analyses images only. Pass the video's frames as images instead."
        )


def _assign_images(
    adapter: VLMAdapter, inputs: Mapping[str, torch.Tensor], placeholders: Bool[torch.Tensor, "batch pos"]
) -> tuple[list[list[ImageSlots]], Bool[torch.Tensor, "batch pos"]]:
    """Each item's images (in order, as many as fill its placeholders) and the image-patch mask."""
    if adapter.n_images(inputs) == 0:
        return [], placeholders
    if not bool(placeholders.any()):
        raise MissingImageError(
            "The batch has 'pixel_values' but no image placeholder tokens in 'input_ids', so the image "
            "would be silently ignored. Build the batch with vlm.prepare or the model's processor, "
            "which insert the placeholders."
        )
    layouts = adapter.image_layouts(inputs)
    per_item, image_mask, taken = [], placeholders.clone(), 0
    for row, n_slots in enumerate(placeholders.sum(-1).tolist()):
        images, filled = [], 0
        while filled < n_slots and taken < len(layouts):
            images.append(layouts[taken])
            filled, taken = filled + len(layouts[taken]), taken + 1
        if filled != n_slots:
            raise ImageCountError(
                f"Item {row} has {n_slots} image placeholder positions but its images fill {filled}. "
                "Give one image per placeholder (vlm.prepare checks this for you)."
            )
        if images:
            patch = torch.cat([image.is_patch for image in images]).to(placeholders.device)
            image_mask[row, placeholders[row]] = patch
        per_item.append(images)
    if taken != len(layouts):
        raise ImageCountError(
            f"The batch has {len(layouts)} images but its placeholders take {taken}. Give one image per "
            "placeholder (vlm.prepare checks this for you)."
        )
    return per_item, image_mask


def _instruction_mask(
    adapter: VLMAdapter,
    input_ids: torch.Tensor,
    real: torch.Tensor,
    image_text: torch.Tensor,
    prompts: Sequence[str],
    spans: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """Mark the tokens whose character span overlaps the instruction's, row by row.

    The processor's non-image tokens must equal the tokenizer's tokens of the prompt (the
    processor only expands/prepends image placeholders); anything else is a processor/tokenizer
    mismatch and is refused rather than guessed.
    """
    text_mask = torch.zeros_like(real)
    for row, (prompt, (start, end)) in enumerate(zip(prompts, spans)):
        ids, offsets = adapter.prompt_token_ids(prompt)
        # the image's tokens in the prompt (a placeholder, or the processor's expansion) on one side,
        # the processor's expansion of them on the other: both left out of the comparison
        written_for_images = adapter.image_text_mask(torch.tensor([ids], dtype=torch.long))[0].tolist()
        keep = [i for i in range(len(ids)) if not written_for_images[i]]
        positions = torch.nonzero(real[row] & ~image_text[row]).flatten()
        row_ids = input_ids[row, positions].tolist()
        if row_ids != [ids[i] for i in keep]:
            raise BatchFormatError(
                f"Item {row}: the processor's text tokens differ from the tokenizer's tokens of the "
                f"prompt {prompt!r}. The processor and tokenizer disagree (a custom processor, or "
                "truncation); pass the processor output directly to get masks without instruction spans."
            )
        for pos, i in zip(positions.tolist(), keep):
            tok_start, tok_end = offsets[i]
            if tok_end > tok_start and tok_start < end and tok_end > start:
                text_mask[row, pos] = True
    return text_mask
