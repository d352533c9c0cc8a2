"""Per-item data for the report's explorer: every layer, every head, on the item's own image.

For a few chosen items (``--report-items``) the report shows what the dataset aggregates average
away: the image, the prompt as tokens, norm-based saliency of each image patch (from the instruction
and from the last position) for every layer and every head, the logit lens's top-1 token of every
image patch per layer, and the logit lens at the last position.

Saliency of image key j at layer l:

- ``head = "all"``: ``||sum_h alpha_h(q, j) f_h(x_j)||`` (Kobayashi et al.'s norm of the attention
  output's part coming from j), exactly what :func:`~hooked_vllm.analysis.collect.collect` stores
  for the dataset (from the last position; from the instruction: summed over its tokens);
- ``head = h``: ``alpha_h(q, j) ||f_h(x_j)||``, that head's share (the heads' shares do not add up
  to the whole: it is the norm of a sum).

Layers are numbered as everywhere in the report: attention layer ``l + 1`` is block ``l``'s
attention, lens layer 0 is the embedding and lens layer ``l + 1`` block ``l``'s output.

Example:
    >>> views = explore(vlm, batch, images, ["cat"], ["What is this?"])  # doctest: +SKIP
    >>> views[0].saliency["last"].shape  # [layer, 1 + head, image patch]  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from jaxtyping import Float, Int

from hooked_vllm.analysis.collect import collect
from hooked_vllm.analysis.norm_attention import head_gram
from hooked_vllm.images import ImageLike, to_rgb

SOURCES = ("text", "last")


@dataclass
class ItemView:
    """One item's explorer data (``n``: the patches of the item's first image, in sequence order)."""

    item_id: str
    instruction: str
    #: the image, downscaled, as a ``data:image/jpeg`` URI
    thumbnail: str
    #: the prompt as tokens (real positions only), with each one's modality
    tokens: list[str]
    modalities: list[str]
    #: per tile (tile 0: the whole image): ``{"tile", "rows", "cols", "index"}``, ``index`` row-major,
    #: the patch drawn in each cell (-1: none)
    tiles: list[dict]
    #: ``{"text" | "last": [layer, 1 + head, n]}``: index 0 all heads, 1 + h head h
    saliency: dict[str, Float[np.ndarray, "layer head_and_all n"]]
    #: logit-lens top-1 token id of every patch, per lens layer (0 = embedding)
    lens_grid: Int[np.ndarray, "lens_layer n"]
    #: logit lens at the last position: top-k token ids and probabilities per lens layer
    lens_last_tokens: Int[np.ndarray, "lens_layer k"]
    lens_last_probs: Float[np.ndarray, "lens_layer k"]


def thumbnail(image: ImageLike, max_side: int = 256, quality: int = 85) -> str:
    """``image`` downscaled to at most ``max_side`` pixels a side, as a JPEG data URI."""
    picture = to_rgb(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tile_layout(slots) -> list[dict]:
    """Where each patch of one image lies: per tile, its grid and the patch index in each cell."""
    cells = slots.grid[slots.is_patch].numpy()
    tiles = []
    for tile in sorted(set(cells[:, 0].tolist())):
        here = np.nonzero(cells[:, 0] == tile)[0]
        rows, cols = int(cells[here, 1].max()) + 1, int(cells[here, 2].max()) + 1
        index = np.full((rows, cols), -1)
        index[cells[here, 1], cells[here, 2]] = here
        tiles.append({"tile": int(tile), "rows": rows, "cols": cols, "index": index.ravel().tolist()})
    return tiles


@torch.no_grad()
def per_head_saliency(vlm, batch) -> dict[str, Float[torch.Tensor, "layer batch head n_image"]]:
    """``alpha_h(q, j) ||f_h(x_j)||`` of every head for each image key j: from the last position
    (``"last"``) and summed over the instruction's tokens (``"text"``); NaN past an item's image
    tokens. One forward pass reading each layer's pattern and values."""
    batch = vlm.to_batch(batch)
    counts = batch.image_mask.sum(-1)
    n = int(counts.max())
    valid = torch.arange(n)[None, :] < counts[:, None]
    positions = torch.zeros(valid.shape, dtype=torch.long)
    positions[valid] = batch.image_mask.nonzero()[:, 1]
    rows = torch.arange(len(batch))
    values: dict[int, torch.Tensor] = {}
    out: dict[str, list[torch.Tensor]] = {source: [] for source in SOURCES}

    def keep_values(v, hook, layer):
        values[layer] = v

    def reduce_pattern(pattern, hook, layer):
        w_o = vlm.blocks[layer].attn.W_O.to(pattern.device)
        f_norm = head_gram(values.pop(layer), w_o).diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [b, k, h]
        alpha = pattern.float()
        from_text = torch.einsum("bq,bhqk->bhk", batch.text_mask.float().to(alpha.device), alpha)
        from_last = alpha[rows, :, batch.last_positions.to(alpha.device)]  # [b, h, k]
        for source, received in (("text", from_text), ("last", from_last)):
            received = received * f_norm.transpose(1, 2)
            picked = received.gather(
                2, positions.to(alpha.device)[:, None, :].expand(-1, received.shape[1], -1)
            )
            out[source].append(picked.masked_fill(~valid.to(alpha.device)[:, None, :], float("nan")).cpu())

    hooks = []
    for layer in range(vlm.cfg.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_v", partial(keep_values, layer=layer)))
        hooks.append((f"blocks.{layer}.attn.hook_pattern", partial(reduce_pattern, layer=layer)))
    vlm.run_with_hooks(batch, fwd_hooks=hooks, return_type=None)
    return {source: torch.stack(layers) for source, layers in out.items()}


@torch.no_grad()
def explore(
    vlm,
    batch,
    images: Sequence[ImageLike],
    item_ids: Sequence[str],
    instructions: Sequence[str],
    *,
    top_k: int = 5,
    thumbnail_side: int = 256,
) -> list[ItemView]:
    """Explorer data of every item of ``batch`` (one image each; ``images`` as given to
    ``vlm.prepare``), from two passes: :func:`collect` (head-summed saliency, the lens) and
    :func:`per_head_saliency`."""
    batch = vlm.to_batch(batch)
    result = collect(vlm, batch, verbalize_images=True, attention="pattern", top_k=top_k)
    heads = per_head_saliency(vlm, batch)
    summed = {
        "text": result.attention.image_saliency_from_text,
        "last": result.attention.image_saliency_from_last,
    }
    views = []
    for b, item_id in enumerate(item_ids):
        if not batch.image_slots or not batch.image_slots[b]:
            raise ValueError(f"Item {item_id!r} has no image: the explorer shows items with one.")
        slots = batch.image_slots[b][0]
        n = int(slots.is_patch.sum())
        saliency = {
            source: torch.cat([summed[source][:, b, None, :n], heads[source][:, b, :, :n]], dim=1).numpy()
            for source in SOURCES
        }
        real = batch.attention_mask[b].bool()
        modality = np.where(batch.image_mask[b], "image", np.where(batch.text_mask[b], "text", "special"))[
            real.numpy()
        ]
        views.append(
            ItemView(
                item_id=str(item_id),
                instruction=instructions[b],
                thumbnail=thumbnail(images[b], thumbnail_side),
                tokens=_real_tokens(vlm, batch, b),
                modalities=modality.tolist(),
                tiles=tile_layout(slots),
                saliency=saliency,
                lens_grid=result.image_verbalization[:, b, :n].numpy(),
                lens_last_tokens=result.lens.top_tokens[:, b, 0].numpy(),
                lens_last_probs=result.lens.top_probs[:, b, 0].float().numpy(),
            )
        )
    return views


def _real_tokens(vlm, batch, b: int) -> list[str]:
    tokens = vlm.to_str_tokens(batch, b)
    real = batch.attention_mask[b].bool().tolist()
    return [token for token, keep in zip(tokens, real) if keep]


def explore_items(
    vlm, items: Sequence, *, batch_size: int = 4, max_pixels: int | None = None, top_k: int = 5
) -> list[ItemView]:
    """:func:`explore` for dataset items (``item_id``, ``image_path``, ``instruction``), in batches."""
    from hooked_vllm.images import load_image

    views: list[ItemView] = []
    for start in range(0, len(items), batch_size):
        chunk = list(items[start : start + batch_size])
        images = [load_image(item.image_path, max_pixels=max_pixels) for item in chunk]
        instructions = [item.instruction for item in chunk]
        batch = vlm.prepare(images, instructions)
        views += explore(vlm, batch, images, [item.item_id for item in chunk], instructions, top_k=top_k)
    return views


def spread(ids: Sequence[str], k: int) -> list[str]:
    """``k`` of ``ids`` spread evenly over them (all of them when ``k >= len(ids)``), in order."""
    if k <= 0 or not ids:
        return []
    if k >= len(ids):
        return list(ids)
    return [ids[int(i)] for i in np.linspace(0, len(ids) - 1, k).round().astype(int)]


def _quantized(maps: np.ndarray) -> dict:
    """``[layer, head, n]`` maps as uint16 per (layer, head) frame between its own min and max
    (65535: no value), base64: 2 bytes a value, relative error below 1e-5 of the frame's range."""
    frames = maps.reshape(-1, maps.shape[-1]).astype(np.float64)
    finite = np.isfinite(frames)
    low = np.where(finite, frames, np.inf).min(-1)
    high = np.where(finite, frames, -np.inf).max(-1)
    low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
    span = np.where(high > low, high - low, 1.0)
    codes = np.round((frames - low[:, None]) / span[:, None] * 65534)
    codes = np.where(finite, codes, 65535).astype("<u2")
    return {
        "data": base64.b64encode(codes.tobytes()).decode("ascii"),
        "low": low.tolist(),
        "high": high.tolist(),
    }


def payload(views: Sequence[ItemView], tokenizer) -> dict:
    """The explorer's data as JSON-ready values: token ids become indices into one shared
    ``vocab`` of decoded strings; saliency maps are quantized (:func:`_quantized`)."""
    vocab: dict[int, int] = {}
    words: list[str] = []

    def word(token: int) -> int:
        if token not in vocab:
            vocab[token] = len(words)
            words.append(tokenizer.decode([token]) if token >= 0 else "")
        return vocab[token]

    items = []
    for view in views:
        n_layers, n_heads_and_all, n = view.saliency["last"].shape
        items.append(
            {
                "id": view.item_id,
                "instruction": view.instruction,
                "thumbnail": view.thumbnail,
                "tokens": [[token, modality] for token, modality in zip(view.tokens, view.modalities)],
                "tiles": view.tiles,
                "n_layers": n_layers,
                "n_heads": n_heads_and_all - 1,
                "n_patches": n,
                "saliency": {source: _quantized(view.saliency[source]) for source in SOURCES},
                "lens_grid": [[word(int(t)) for t in layer] for layer in view.lens_grid],
                "lens_last": [
                    [[word(int(t)), round(float(p), 4)] for t, p in zip(tokens, probs)]
                    for tokens, probs in zip(view.lens_last_tokens, view.lens_last_probs)
                ],
            }
        )
    return {"vocab": words, "items": items}
