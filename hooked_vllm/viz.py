"""Per-image-token results drawn on the image, for notebooks.

A result per image token (saliency, a probe's score, ...) lies on the image where the batch's layout
says that token's patch is (:class:`~hooked_vllm.adapters.base.ImageSlots`): tile 0 is the whole
image (LLaVA-1.5, Qwen, Gemma 3, PaliGemma: the only tile; LLaVA-NeXT/OneVision's base view;
Idefics3's global image; InternVL's thumbnail), laid over the picture; further tiles (high-resolution
crops) are drawn as grids of their own beside it.

Example:
    >>> result = collect(vlm, batch)  # doctest: +SKIP
    >>> fig = show_saliency(vlm, batch, result, item=0, layer=10, image=image)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from hooked_vllm.adapters.base import ImageSlots
from hooked_vllm.images import ImageLike, to_rgb


def tile_grids(
    slots: ImageSlots, values: Float[torch.Tensor, " n_patches"] | np.ndarray
) -> dict[int, np.ndarray]:
    """``{tile: [rows, cols] array}`` of one image's per-patch ``values`` (in the order of its patch
    slots, structure slots left out), NaN where no patch lies."""
    values = np.asarray(values, dtype=float)
    cells = slots.grid[slots.is_patch].numpy()
    if len(cells) != len(values):
        raise ValueError(f"{len(values)} values for an image of {len(cells)} image-patch tokens.")
    grids = {}
    for tile in sorted(set(cells[:, 0].tolist())):
        here = cells[:, 0] == tile
        rows, cols = cells[here, 1].max() + 1, cells[here, 2].max() + 1
        grid = np.full((rows, cols), np.nan)
        grid[cells[here, 1], cells[here, 2]] = values[here]
        grids[tile] = grid
    return grids


def on_image(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[rows, cols]`` grid stretched over an image of ``size`` (width, height): cell (r, c)
    covers rows ``[r * H / rows, (r + 1) * H / rows)`` and likewise columns (the processors resize
    the whole image onto the patch grid)."""
    width, height = size
    rows, cols = grid.shape
    row_of = np.minimum((np.arange(height) * rows) // height, rows - 1)
    col_of = np.minimum((np.arange(width) * cols) // width, cols - 1)
    return grid[row_of[:, None], col_of[None, :]]


def item_values(result: Any, item: int, layer: int, source: str = "last") -> np.ndarray:
    """One item's image-token saliency at ``layer`` (attention layer, 0-based) from a
    :class:`~hooked_vllm.analysis.collect.BatchAnalysis`: from the ``"last"`` position or the
    ``"text"`` (instruction) tokens, without the batch's padding."""
    maps = {
        "last": result.attention.image_saliency_from_last,
        "text": result.attention.image_saliency_from_text,
    }
    if source not in maps:
        raise ValueError(f"source must be 'last' or 'text'; got {source!r}.")
    n = result.n_image_tokens[item]
    return maps[source][layer, item, :n].numpy()


def show_saliency(
    vlm: Any,
    batch: Any,
    result: Any,
    item: int,
    layer: int,
    *,
    image: ImageLike,
    source: str = "last",
    alpha: float = 0.55,
) -> Any:
    """Norm-based saliency of item ``item``'s (first) image tokens at attention layer ``layer``
    (0-based; titled ``layer + 1`` as in the report), laid over ``image``; crops beside it.

    Returns a matplotlib figure (one colour scale for every panel)."""
    import matplotlib.pyplot as plt

    values = item_values(result, item, layer, source)
    images = batch.image_slots[item]
    if not images:
        raise ValueError(f"Item {item} has no image.")
    slots = images[0]
    grids = tile_grids(slots, values[: int(slots.is_patch.sum())])
    picture = to_rgb(image)
    low, high = np.nanmin(values), np.nanmax(values)
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (tile, grid) in zip(axes[0], grids.items()):
        if tile == 0:
            ax.imshow(picture)
            shown = ax.imshow(on_image(grid, picture.size), alpha=alpha, cmap="viridis", vmin=low, vmax=high)
            ax.set_title(f"layer {layer + 1}, on the image")
        else:
            shown = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high)
            ax.set_title(f"tile {tile}")
        ax.set_xticks([])
        ax.set_yticks([])
    whom = "the last position" if source == "last" else "the instruction"
    fig.colorbar(shown, ax=axes[0].tolist(), label=f"norm-based attention from {whom}")
    return fig


def lens_token_grids(vlm: Any, batch: Any, result: Any, item: int, layer: int) -> dict[int, np.ndarray]:
    """``{tile: [rows, cols] array of str}``: the logit lens's top-1 token of each of the item's
    (first) image patches at ``layer`` (0 = the embedding, as the logit-lens figures count), laid out
    on its tiles ("" where no patch lies). Needs ``collect(..., verbalize_images=True)``."""
    if result.image_verbalization is None:
        raise ValueError("The result has no image verbalization: run collect(..., verbalize_images=True).")
    slots = batch.image_slots[item][0]
    n = int(slots.is_patch.sum())
    tokens = result.image_verbalization[layer, item, :n].tolist()
    words = [vlm.tokenizer.decode([token]) for token in tokens]
    index_grids = tile_grids(slots, np.arange(n, dtype=float))
    return {
        tile: np.vectorize(lambda k: "" if np.isnan(k) else words[int(k)], otypes=[object])(grid)
        for tile, grid in index_grids.items()
    }


def show_lens_grid(vlm: Any, batch: Any, result: Any, item: int, layer: int) -> Any:
    """The logit lens's top-1 token of every image patch at ``layer`` (0 = embedding), written on
    the patch grid of each tile (tile 0: the whole image). Returns a matplotlib figure."""
    import matplotlib.pyplot as plt

    grids = lens_token_grids(vlm, batch, result, item, layer)
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (tile, grid) in zip(axes[0], grids.items()):
        rows, cols = grid.shape
        ax.set_xlim(-0.5, cols - 0.5)
        ax.set_ylim(rows - 0.5, -0.5)
        for (r, c), word in np.ndenumerate(grid):
            ax.text(c, r, word.strip() or repr(word), ha="center", va="center", fontsize=7)
        ax.set_title(f"layer {layer}, tile {tile}" if tile else f"layer {layer}, whole image")
        ax.set_xticks(range(cols))
        ax.set_yticks(range(rows))
        ax.grid(False)
    return fig


__all__ = ["item_values", "lens_token_grids", "on_image", "show_lens_grid", "show_saliency", "tile_grids"]
