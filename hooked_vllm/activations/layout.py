"""Which rows an activation store holds and where each hook's vectors come from.

One row per (item, language-model position) selected by ``positions``:

- ``image``: the image positions (``batch.image_mask``); ``text``: the instruction tokens;
  ``last``: each item's last prompt token; ``all``: every real (non-padding) token.

Language-model hooks (``blocks.{l}.*``, ``hook_embed``: ``[batch, pos, ...]``) give each row the
vector at its position (trailing dimensions flattened: ``attn.hook_z`` is ``n_heads * d_head``).
Per-image hooks have no position: ``hook_visual_prefix`` ``[n_slots, d_model]`` (images in turn),
``vision.blocks.{l}.hook_resid_post`` ``[n_images, 1 + n_patches, d_vision]`` and
``qformer.blocks.{l}.hook_resid_post`` ``[n_images, n_query + n_text, d_qformer]``. They are stored
in the rows of the image positions where the map is 1:1 (:func:`image_layout`):

- ``hook_visual_prefix``: image token k of image i <-> its k-th image position, every family.
- LLaVA's vision tower: patch k <-> image position k. Under ``vision_feature_select_strategy``
  ``"default"`` the CLS token (index 0) reaches no position and is not stored; under ``"full"`` it is
  image position 0.
- InstructBLIP's Q-Former: query k <-> image position k (the 32 queries are the image positions); the
  Q-Former's instruction tokens that follow the queries are not stored.
- Gemma 3: its soft tokens on their square grid; its vision patches are pooled (no map). PaliGemma:
  SigLIP patch k <-> image position k. Families whose images give varying token counts (tiles,
  dynamic resolution) are refused for now.
- InstructBLIP's vision tower: no map (its 257 patches reach the language model only through the
  Q-Former's cross-attention): refused, naming the hooks that do map.

With ``positions="all"`` a per-image hook's vector is NaN at the rows that are not image positions;
with ``text`` or ``last`` it is refused. Grid rows and columns: LLaVA's image positions are
row-major over its ``sqrt(n) x sqrt(n)`` patch grid; InstructBLIP's queries have none (-1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hooked_vllm.activations.constants import POSITIONS
from hooked_vllm.errors import HookedVLMError, UnsupportedModelError
from hooked_vllm.model.batch import VLMBatch

MODALITIES = ("image", "text", "special")
PER_IMAGE = ("hook_visual_prefix", "vision.", "qformer.")
#: hooks with no vector per position (their second dimension is heads, or a sequence of keys)
NO_VECTOR_PER_POSITION = ("hook_pattern", "hook_attn_scores")


class HookSelectionError(HookedVLMError):
    """Hooks or positions that the store cannot hold as one vector per row."""


@dataclass(frozen=True)
class ImageLayout:
    """How one image's tokens lie in the language model's sequence, per image token."""

    grid_row: tuple[int, ...]
    grid_col: tuple[int, ...]
    tile: tuple[int, ...]
    #: per-image hook (name or prefix) -> the index, in that hook's tokens, of image token 0
    sources: dict[str, int] = field(default_factory=dict)
    #: per-image hook prefixes whose tokens do not map to image positions -> why
    unmapped: dict[str, str] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.grid_row)

    def source(self, hook: str) -> int:
        """Index of the hook's token that image token 0 comes from; refuses hooks without a map."""
        for prefix, why in self.unmapped.items():
            if hook.startswith(prefix):
                raise HookSelectionError(f"{hook}: {why}")
        for prefix, offset in self.sources.items():
            if hook == prefix or hook.startswith(prefix):
                return offset
        raise HookSelectionError(f"{hook} is not a per-image hook of this model.")


def image_layout(vlm) -> ImageLayout:
    """The layout of one image's tokens: the one place that knows it per family (add tiles here)."""
    config = vlm.hf_model.config
    family = vlm.adapter.family
    if family == "llava":
        side = config.vision_config.image_size // config.vision_config.patch_size
        cls = int(config.vision_feature_select_strategy == "full")
        cells = range(side * side)
        return ImageLayout(
            grid_row=(-1,) * cls + tuple(p // side for p in cells),
            grid_col=(-1,) * cls + tuple(p % side for p in cells),
            tile=(0,) * (cls + side * side),
            sources={"hook_visual_prefix": 0, "vision.": 1 - cls},
        )
    if family == "instructblip":
        n = int(config.num_query_tokens)
        return ImageLayout(
            grid_row=(-1,) * n,
            grid_col=(-1,) * n,
            tile=(-1,) * n,
            sources={"hook_visual_prefix": 0, "qformer.": 0},
            unmapped={
                "vision.": "InstructBLIP's vision patches have no language-model position (the "
                "Q-Former's queries read them by cross-attention). Store qformer.blocks.{l}."
                "hook_resid_post or hook_visual_prefix (one vector per image position), or read the "
                "patches with vlm.run_with_cache."
            },
        )
    if family == "gemma3":
        n = int(config.mm_tokens_per_image)
        side = int(round(n**0.5))
        return ImageLayout(
            grid_row=tuple(p // side for p in range(n)),
            grid_col=tuple(p % side for p in range(n)),
            tile=(0,) * n,
            sources={"hook_visual_prefix": 0},
            unmapped={
                "vision.": "Gemma 3's vision patches are average-pooled into its image tokens, so a "
                "patch has no language-model position of its own. Store hook_visual_prefix or "
                "blocks.{l}.* hooks, or read the patches with vlm.run_with_cache."
            },
        )
    if family == "paligemma":  # SigLIP's patches are the image tokens, one to one (no pooling)
        side = config.vision_config.image_size // config.vision_config.patch_size
        cells = range(side * side)
        return ImageLayout(
            grid_row=tuple(p // side for p in cells),
            grid_col=tuple(p % side for p in cells),
            tile=(0,) * (side * side),
            sources={"hook_visual_prefix": 0, "vision.": 0},
        )
    raise UnsupportedModelError(
        f"The activation store does not support the {family!r} family yet: its images give a varying "
        "number of image tokens (tiles or dynamic resolution), and the store lays out a fixed number per "
        "image. It supports llava, instructblip, gemma3 and paligemma; for this model use vlm.run_with_cache."
    )


def is_per_image(hook: str) -> bool:
    return hook == "hook_visual_prefix" or hook.startswith(PER_IMAGE[1:])


def check_hooks(vlm, hooks: Sequence[str], positions: str, layout: ImageLayout) -> list[str]:
    """The hooks as a list, checked by name (widths are checked on a forward: see activation_store)."""
    if positions not in POSITIONS:
        raise HookSelectionError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}.")
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks or not all(isinstance(h, str) and h for h in hooks):
        raise HookSelectionError(
            f"Give one or more hook names, e.g. blocks.0.hook_resid_post; got {hooks!r}."
        )
    doubled = sorted({h for h in hooks if hooks.count(h) > 1})
    if doubled:
        raise HookSelectionError(f"Hook(s) {', '.join(doubled)} given twice; name each once.")
    known = vlm.hook_dict
    for hook in hooks:
        if hook not in known:
            import difflib

            near = difflib.get_close_matches(hook, list(known), n=3)
            hint = f" Did you mean {', '.join(near)}?" if near else ""
            raise HookSelectionError(
                f"Unknown hook {hook!r}.{hint} See vlm.hook_dict for the names (e.g. "
                "blocks.0.hook_resid_post, hook_visual_prefix, vision.blocks.0.hook_resid_post)."
            )
        if hook.endswith(NO_VECTOR_PER_POSITION):
            raise HookSelectionError(
                f"{hook} has no vector per position (its shape is [batch, head, query, key]). Store "
                "blocks.{l}.attn.hook_z or hook_q/k/v (one vector per position), or read patterns with "
                "vlm.run_with_cache."
            )
        if is_per_image(hook):
            layout.source(hook)
    check_positions(hooks, positions)
    return hooks


def check_positions(hooks: Sequence[str], positions: str) -> None:
    """Per-image hooks have vectors at image positions only: refused with ``text`` and ``last``."""
    for hook in hooks:
        if is_per_image(hook) and positions in ("text", "last"):
            raise HookSelectionError(
                f"{hook} is per image: it has vectors only at image positions, not at --positions "
                f"{positions}. Use --positions image (or all: NaN at the other rows), or store it in a "
                "separate run."
            )


def stop_point(hooks: Sequence[str]) -> str | None:
    """The hook after which no requested hook fires: the forward stops there (``None``: run it all)."""
    layers = []
    for hook in hooks:
        match = re.match(r"blocks\.(\d+)\.", hook)
        if match:
            layers.append(int(match.group(1)))
        elif not (is_per_image(hook) or hook in ("hook_embed", "embed.hook_out", "embed.hook_in")):
            return None
    return f"blocks.{max(layers)}.hook_out" if layers else "hook_embed"


# ---------------------------------------------------------------- one batch -> rows
@dataclass
class Rows:
    """The selected rows of a batch, in item order then position order."""

    item: torch.Tensor  # [R] index of the item in the batch
    column: torch.Tensor  # [R] column in the batch's tensors
    image: torch.Tensor  # [R] bool: the row is an image position
    flat_image: torch.Tensor  # [R] index of its image among the batch's images (-1: none)
    image_index: torch.Tensor  # [R] index of its image among the item's images (-1: none)
    token: torch.Tensor  # [R] index of the row among its image's tokens (-1: none)

    def __len__(self) -> int:
        return int(self.item.shape[0])


def select_rows(batch: VLMBatch, positions: str, layout: ImageLayout) -> Rows:
    image_mask = batch.image_mask.cpu()
    if positions == "image":
        selected = image_mask
    elif positions == "text":
        selected = batch.text_mask.cpu()
    elif positions == "all":
        selected = batch.attention_mask.cpu().bool()
    else:
        selected = torch.zeros_like(image_mask)
        selected[torch.arange(len(batch)), batch.last_positions.cpu()] = True
    n = layout.n_tokens
    per_item = image_mask.sum(1)
    if bool((per_item % n).any()):
        raise HookSelectionError(
            f"An item has {int(per_item[(per_item % n) > 0][0])} image positions, not a multiple of the "
            f"{n} tokens per image this model's layout gives. The processor and the model's config disagree."
        )
    first_image = (per_item // n).cumsum(0) - per_item // n
    rank = image_mask.long().cumsum(1) - 1
    item, column = selected.nonzero(as_tuple=True)
    image = image_mask[item, column]
    k = rank[item, column]
    image_index = torch.where(image, k // n, -1)
    flat_image = torch.where(image, first_image[item] + image_index, -1)
    return Rows(item, column, image, flat_image, image_index, torch.where(image, k % n, -1))


def capture(vlm, batch: VLMBatch, hooks: Sequence[str], rows: Rows, layout: ImageLayout) -> dict:
    """``{hook: [R, width]}`` for the rows, gathered inside the hooks (the forward stops after the last
    hook that is needed)."""
    out: dict[str, torch.Tensor] = {}
    n_images = int(rows.flat_image.max()) + 1 if bool(rows.image.any()) else 0

    def gather(tensor: torch.Tensor, hook, name: str) -> None:
        device = tensor.device
        if is_per_image(name):
            offset = layout.source(name)
            if name == "hook_visual_prefix" and tensor.dim() == 2:  # [n_slots, d]: images one after another
                tensor = tensor.view(-1, layout.n_tokens, tensor.shape[-1])
            if tensor.dim() < 3 or tensor.shape[0] < n_images or tensor.shape[1] < offset + layout.n_tokens:
                raise HookSelectionError(
                    f"{name} has shape {tuple(tensor.shape)}; expected [n_images, >= "
                    f"{offset + layout.n_tokens}, width] (the model's image layout). Report this with the "
                    "model's config."
                )
            image = rows.image.to(device)
            flat = tensor.reshape(tensor.shape[0], tensor.shape[1], -1)
            values = flat[
                rows.flat_image.clamp(min=0).to(device), (rows.token.clamp(min=0) + offset).to(device)
            ]
            if not bool(rows.image.all()):
                values = torch.where(image[:, None], values, torch.full_like(values, float("nan")))
        else:
            if tuple(tensor.shape[:2]) != tuple(batch.input_ids.shape):
                raise HookSelectionError(
                    f"{name} has shape {tuple(tensor.shape)}, not [batch, pos, ...] = "
                    f"{tuple(batch.input_ids.shape)}: it has no vector per position. Store hooks of the "
                    "residual stream, attention or MLP (blocks.{l}.*), hook_embed or the per-image hooks."
                )
            values = tensor[rows.item.to(device), rows.column.to(device)]
            values = values.reshape(values.shape[0], -1)
        out[name] = values

    def stop(tensor: torch.Tensor, hook) -> None:
        raise _Stop

    fwd = [(name, lambda t, hook, name=name: gather(t, hook, name)) for name in hooks]
    where = stop_point(hooks)
    if where is not None:
        fwd.append((where, stop))
    try:
        with vlm.hooks(fwd_hooks=fwd):
            vlm.forward(batch, return_type=None)
    except _Stop:
        pass
    return out


class _Stop(Exception):
    """Raised by the last needed hook to end the forward early."""


def row_metadata(vlm, batch: VLMBatch, rows: Rows, layout: ImageLayout) -> dict[str, np.ndarray | list]:
    """Per row: position, modality, image index, patch, grid row/column, tile, token id and string."""
    item, column = rows.item.numpy(), rows.column.numpy()
    image = rows.image.numpy()
    modality = np.where(image, 0, np.where(batch.text_mask.cpu().numpy()[item, column], 1, 2))
    token = rows.token.numpy()

    def per_token(values: tuple[int, ...]) -> np.ndarray:
        return np.where(image, np.asarray(values, dtype=np.int32)[np.maximum(token, 0)], -1).astype(np.int32)

    strings = {b: vlm.to_str_tokens(batch, index=b) for b in np.unique(item).tolist()}
    return {
        "position": batch.position_ids.cpu().numpy()[item, column].astype(np.int32),
        "modality": modality.astype(np.int64),
        "image_index": rows.image_index.numpy().astype(np.int32),
        "patch": token.astype(np.int32),
        "grid_row": per_token(layout.grid_row),
        "grid_col": per_token(layout.grid_col),
        "tile": per_token(layout.tile),
        "token_id": batch.input_ids.cpu().numpy()[item, column].astype(np.int32),
        "token": [strings[b][c] for b, c in zip(item.tolist(), column.tolist())],
    }


def rows_per_prompt(vlm, instruction: str, positions: str, layout: ImageLayout, n_images: int = 1) -> int:
    """Rows one item gives, from its tokens alone (no image is read): for the size estimate. Text
    tokens are those whose characters overlap the instruction's, as in :mod:`hooked_vllm.model.batch`."""
    if positions == "last":
        return 1
    image_rows = n_images * layout.n_tokens
    if positions == "image":
        return image_rows
    adapter = vlm.adapter
    prompt, (start, end) = adapter.format_prompt(instruction, n_images)
    ids, spans = adapter.prompt_token_ids(prompt)
    text = [span for tok, span in zip(ids, spans) if tok != adapter.image_token_id]
    if positions == "all":
        return len(text) + image_rows
    return sum(1 for a, b in text if b > a and a < end and b > start)
