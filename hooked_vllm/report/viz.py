"""Figures for notebooks: per-image-token results drawn on the image, patching heatmaps, attention.

Every function returns a matplotlib figure (a static PNG in a notebook, nbconvert and GitHub alike).

A result per image token (saliency, a probe's score, ...) lies on the image where the batch's layout
says that token's patch is (:class:`~hooked_vllm.adapters.base.ImageSlots`): tile 0 is the whole
image (LLaVA-1.5, Qwen, Gemma 3, PaliGemma: the only tile; LLaVA-NeXT/OneVision's base view;
Idefics3's global image; InternVL's thumbnail), laid over the picture; further tiles (high-resolution
crops) are drawn as grids of their own beside it.

Positions are drawn with their modality (image / instruction / special, from the batch's masks) as a
colour strip along the axes.

Example:
    >>> result = collect(vlm, batch)  # doctest: +SKIP
    >>> fig = show_saliency(vlm, batch, result, item=0, layer=10, image=image)  # doctest: +SKIP
    >>> fig = show_patching(patch_by_modality(vlm, clean, corrupt, metric))  # doctest: +SKIP
    >>> logits, cache = vlm.run_with_cache(batch)  # doctest: +SKIP
    >>> fig = show_attention(vlm, cache, batch, item=0, layer=2, image=image)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float

from hooked_vllm.adapters.base import ImageSlots
from hooked_vllm.model.images import ImageLike, to_rgb
from hooked_vllm.model.layers import check_blocks, check_stream_layer

if TYPE_CHECKING:
    from hooked_vllm.interventions.patching import PatchingResult


def tile_grids(
    slots: ImageSlots, values: Float[torch.Tensor, " n_patches"] | np.ndarray
) -> dict[int, np.ndarray]:
    """``{tile: [rows, cols] array}`` of one image's per-patch ``values`` (in the order of its patch
    slots, structure slots left out), NaN where no patch lies."""
    values = np.asarray(values, dtype=float)
    n_patches = int(slots.is_patch.sum())
    if n_patches != len(values):
        raise ValueError(f"{len(values)} values for an image of {n_patches} image-patch tokens.")
    grids = {}
    for tile, index in slots.patch_index().items():
        index = index.numpy()
        grids[tile] = np.where(index >= 0, values[np.maximum(index, 0)], np.nan)
    return grids


def seen_part(vlm: Any, image: ImageLike) -> Any:
    """The part of ``image`` that tile 0's patch grid covers (``adapter.image_region``: LLaVA-1.5's
    processor keeps the centre square of a non-square image; most resize the whole image)."""
    picture = to_rgb(image)
    if vlm is None:
        return picture
    left, top, right, bottom = vlm.adapter.image_region(picture.size)
    return picture.crop((round(left), round(top), round(right), round(bottom)))


def on_image(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[rows, cols]`` grid stretched over an image of ``size`` (width, height): cell (r, c)
    covers rows ``[r * H / rows, (r + 1) * H / rows)`` and likewise columns. Pass the part of the
    image the grid covers (:func:`seen_part`)."""
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
    check_blocks(len(maps[source]), [layer], "saliency")
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
    """Norm-based saliency of item ``item``'s (first) image tokens in layer ``layer``'s attention
    (block ``layer``, as ``cache["pattern", layer]``), laid over the part of ``image`` the model
    saw (:func:`seen_part`); crops beside it. Image tokens that are not regions (InstructBLIP's
    queries) are drawn as a grid of their own.

    Returns a matplotlib figure (one colour scale for every panel)."""
    import matplotlib.pyplot as plt

    values = item_values(result, item, layer, source)
    images = batch.image_slots[item]
    if not images:
        raise ValueError(f"Item {item} has no image.")
    slots = images[0]
    values = values[: int(slots.is_patch.sum())]  # the first image's (the scale too)
    grids = tile_grids(slots, values)
    picture = seen_part(vlm, image)
    low, high = np.nanmin(values), np.nanmax(values)
    fig, axes = plt.subplots(1, len(grids), figsize=(4 * len(grids), 4), squeeze=False)
    for ax, (tile, grid) in zip(axes[0], grids.items()):
        if tile == 0 and slots.spatial:
            ax.imshow(picture)
            shown = ax.imshow(on_image(grid, picture.size), alpha=alpha, cmap="viridis", vmin=low, vmax=high)
            ax.set_title(f"layer {layer}, on the image")
        elif not slots.spatial:
            shown = ax.imshow(grid, cmap="viridis", vmin=low, vmax=high)
            ax.set_title(f"layer {layer}: image tokens that are not regions")
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
    check_stream_layer(len(result.image_verbalization) - 1, layer, "logit lens")
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


# ---------------------------------------------------------------- positions and their modality
#: the colour of each modality's strip (image, instruction, special)
MODALITY_COLOURS = {"image": "tab:orange", "text": "tab:blue", "special": "0.75"}
MODALITY_NAMES = {"image": "image", "text": "instruction", "special": "special"}


def position_modalities(batch: Any, item: int, real_only: bool = True) -> list[str]:
    """``"image"``, ``"text"`` or ``"special"`` for each of item ``item``'s positions (padding left
    out unless ``real_only`` is False)."""
    codes = np.full(batch.image_mask.shape[1], "special", dtype=object)
    codes[batch.text_mask[item].cpu().numpy()] = "text"
    codes[batch.image_mask[item].cpu().numpy()] = "image"
    if real_only:
        codes = codes[batch.attention_mask[item].bool().cpu().numpy()]
    return codes.tolist()


def _modality_strip(ax: Any, modalities: Sequence[str], where: str, size: float = 0.04) -> Any:
    """A strip of modality colours along ``where`` ("top" or "left") of ``ax`` (an inset, so the
    layout engine makes room for it and its tick labels); returns its axes."""
    from matplotlib.colors import ListedColormap

    order = list(MODALITY_COLOURS)
    codes = np.array([[order.index(m) for m in modalities]], dtype=float)
    bounds = [0, 1.01, 1, size] if where == "top" else [-0.01 - size, 0, size, 1]
    strip = ax.inset_axes(bounds)
    cmap = ListedColormap(list(MODALITY_COLOURS.values()))
    strip.imshow(
        codes if where == "top" else codes.T, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5
    )
    strip.set_label(f"modality strip ({where})")
    strip.set_xticks([])
    strip.set_yticks([])
    return strip


def _modality_legend(fig: Any, modalities: Sequence[str]) -> None:
    from matplotlib.patches import Patch

    present = [m for m in MODALITY_COLOURS if m in set(modalities)]
    handles = [Patch(color=MODALITY_COLOURS[m], label=MODALITY_NAMES[m]) for m in present]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _tick_positions(n: int, max_labels: int) -> list[int]:
    return list(range(n)) if n <= max_labels else list(range(0, n, int(np.ceil(n / max_labels))))


# ---------------------------------------------------------------- activation patching
def show_patching(
    result: PatchingResult | Float[torch.Tensor, "layer pos"],
    *,
    str_tokens: Sequence[str] | None = None,
    batch: Any = None,
    item: int = 0,
    baseline: float | None = None,
    relative: bool = False,
    metric: str = "metric",
    annotate: bool | None = None,
    max_labels: int = 80,
) -> Any:
    """Activation patching as a layer x position heatmap: rows are layers, columns the patched
    positions (or the modality groups a :class:`~hooked_vllm.interventions.patching.PatchingResult`
    holds: ``effects[layer, group]``), drawn as the array is stored.

    ``result``: a ``PatchingResult`` or TransformerLens's ``Float[Tensor, "layer pos"]`` (what
    ``transformer_lens.patching.get_act_patch_resid_pre`` returns). The diverging colour scale is
    centred on "no effect": the unpatched target's metric (``result.corrupt``; for a tensor
    ``baseline``, default 0). ``relative`` draws ``(value - corrupt) / (clean - corrupt)``: 0 no
    effect, 1 the clean run restored. ``str_tokens`` labels the columns; ``batch`` (with ``item``)
    adds each position's modality as a strip above them. Cells are written on small grids
    (``annotate``). Returns a matplotlib figure.

    Example:
        >>> result = patch_by_modality(vlm, clean, corrupt, logit_diff(corrupt, red, blue))  # doctest: +SKIP
        >>> show_patching(result, relative=True)  # doctest: +SKIP
        >>> effect = patching.get_act_patch_resid_pre(vlm, corrupt, clean_cache, metric)  # doctest: +SKIP
        >>> tokens, unpatched = vlm.to_str_tokens(clean), float(metric(vlm(corrupt)))  # doctest: +SKIP
        >>> show_patching(effect, str_tokens=tokens, batch=clean, baseline=unpatched)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if isinstance(result, torch.Tensor | np.ndarray):
        values = np.asarray(torch.as_tensor(result).detach().float().cpu(), dtype=float)
        if values.ndim != 2:
            raise ValueError(f"A patching tensor is [layer, pos]; got shape {tuple(values.shape)}.")
        layers, columns, hook = list(range(values.shape[0])), None, None
        centre, clean, corrupt = (0.0 if baseline is None else float(baseline)), None, None
        if relative:
            raise ValueError("relative=True needs a PatchingResult (its clean and corrupt metrics).")
    else:
        values = result.effects.detach().float().cpu().numpy().astype(float)
        layers, columns, hook = list(result.layers), list(result.groups), result.hook
        centre, clean, corrupt = (
            (result.corrupt if baseline is None else float(baseline)),
            result.clean,
            result.corrupt,
        )
    if relative:
        if clean == centre:
            raise ValueError("relative=True: the clean and corrupt metrics are equal, nothing to restore.")
        values = (values - centre) / (clean - centre)
        centre = 0.0
    n_rows, n_cols = values.shape
    if str_tokens is not None:
        if len(str_tokens) != n_cols:
            raise ValueError(f"{len(str_tokens)} str_tokens for {n_cols} patched positions.")
        columns = list(str_tokens)
    span = float(np.nanmax(np.abs(values - centre))) if np.isfinite(values).any() else 0.0
    span = span or 1.0
    width = min(max(3.0 + 0.22 * n_cols, 6.0), 16.0)
    fig, ax = plt.subplots(figsize=(width, min(1.9 + 0.35 * n_rows, 9.0)), layout="constrained")
    shown = ax.imshow(values, cmap="RdBu", vmin=centre - span, vmax=centre + span, aspect="auto")
    ax.set_label("patching")
    ticks = _tick_positions(n_cols, max_labels)
    if columns is not None:
        ax.set_xticks(ticks, [str(columns[i]) for i in ticks], rotation=90 if n_cols > 6 else 0, fontsize=8)
    else:
        ax.set_xticks(ticks)
    row_names = ["visual prefix"] if hook == "visual_prefix" else [str(layer) for layer in layers]
    ax.set_yticks(range(n_rows), row_names)
    ax.set_xlabel("patched positions" if hook is not None and str_tokens is None else "position")
    ax.set_ylabel(f"layer ({hook})" if hook and hook != "visual_prefix" else "layer")
    if annotate if annotate is not None else n_rows * n_cols <= 120:
        for (r, c), value in np.ndenumerate(values):
            dark = abs(value - centre) > 0.6 * span
            ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=7, color="w" if dark else "k")
    if batch is not None:
        modalities = position_modalities(batch, item, real_only=False)
        if len(modalities) != n_cols:
            raise ValueError(f"The batch has {len(modalities)} positions; the result {n_cols} columns.")
        _modality_strip(ax, modalities, "top", size=0.06)
        _modality_legend(fig, modalities)
    label = f"{metric}, relative: (x - corrupt) / (clean - corrupt)" if relative else metric
    fig.colorbar(shown, ax=ax, label=label, shrink=0.9)
    title = f"patching {hook}" if hook else "activation patching"
    if clean is not None and not relative:
        title += f"\nclean {clean:.3g}, corrupt {corrupt:.3g}"
        title += " (white: no effect)" if centre == corrupt else f"; white: {centre:.3g}, no effect"
    elif relative:
        title += "\n0: no effect, 1: clean restored"
    else:
        title += f"\nwhite: {centre:.3g}, no effect"
    fig.suptitle(title, fontsize=10)
    return fig


# ---------------------------------------------------------------- attention
def attention_pattern(
    cache_or_pattern: Any, layer: int | None = None
) -> Float[torch.Tensor, "batch head query key"] | Float[torch.Tensor, "batch query key"]:
    """The ``[batch, head, query, key]`` pattern of ``layer`` from a cache (``cache["pattern", layer]``,
    as TransformerLens names it), or the given tensor itself."""
    if isinstance(cache_or_pattern, torch.Tensor):
        if cache_or_pattern.dim() not in (3, 4):
            raise ValueError(
                "A pattern is [batch, head, query, key] (or [batch, query, key] for one map per item); "
                f"got shape {tuple(cache_or_pattern.shape)}."
            )
        return cache_or_pattern.detach().float().cpu()
    if layer is None:
        raise ValueError("Pass the layer whose pattern to read from the cache.")
    model = getattr(cache_or_pattern, "model", None)
    if getattr(model, "cfg", None) is not None:
        check_blocks(model.cfg.n_layers, [layer], "attention pattern")
    name = f"blocks.{layer}.attn.hook_pattern"
    try:
        return cache_or_pattern[name].detach().float().cpu()
    except KeyError:
        raise ValueError(
            f"The cache has no {name}: run vlm.run_with_cache(batch) without a names_filter, or with one "
            "that keeps 'hook_pattern'."
        ) from None


def attention_grids(
    batch: Any, item: int, row: Float[torch.Tensor, " pos"] | np.ndarray, image: int = 0
) -> dict[int, np.ndarray]:
    """``{tile: [rows, cols] array}``: one query's attention ``row`` (over the batch's positions)
    at the patch positions of item ``item``'s image ``image``, laid out on that image's tiles."""
    images = batch.image_slots[item] if batch.image_slots else []
    if image >= len(images):
        raise ValueError(f"Item {item} has {len(images)} images; no image {image}.")
    counts = [int(slots.is_patch.sum()) for slots in images]
    positions = batch.image_mask[item].nonzero().flatten().cpu().numpy()
    start = sum(counts[:image])
    row = np.asarray(torch.as_tensor(row).float().cpu(), dtype=float)
    return tile_grids(images[image], row[positions[start : start + counts[image]]])


def _attention_panel(
    ax: Any, matrix: np.ndarray, modalities: Sequence[str], labels, vmax: float, max_labels: int
):
    shown = ax.imshow(matrix, cmap="Blues", vmin=0.0, vmax=vmax, aspect="equal", interpolation="nearest")
    n = len(matrix)
    ticks = _tick_positions(n, max_labels)
    top = _modality_strip(ax, modalities, "top")
    left = _modality_strip(ax, modalities, "left")
    if labels is not None:
        names = [labels[i] for i in ticks]
        ax.set_xticks(ticks, names, rotation=90, fontsize=6)
        ax.set_yticks([])
        left.set_yticks(ticks, names, fontsize=6)
        for tick, i in zip([*ax.get_xticklabels(), *left.get_yticklabels()], [*ticks, *ticks]):
            tick.set_color("k" if modalities[i] == "special" else MODALITY_COLOURS[modalities[i]])
        ax.set_xlabel("key")
        left.set_ylabel("query")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return shown, top


def show_attention(
    vlm: Any,
    cache_or_pattern: Any | Float[torch.Tensor, "batch head query key"],
    batch: Any,
    item: int,
    layer: int | None = None,
    head: int | None = None,
    *,
    per_head: bool = False,
    query: int | None = None,
    image: ImageLike | None = None,
    alpha: float = 0.55,
    max_labels: int = 64,
    label: str = "attention",
) -> Any:
    """TransformerLens-style attention view of item ``item`` at block ``layer`` (0-based,
    ``L{layer}H{head}``): the query x key pattern of ``head`` (None: the mean over heads) with each
    position's token on the axes and its modality (image / instruction / special) as a colour
    strip (``vlm`` gives the tokens; None leaves them out); ``per_head`` draws every head instead,
    on one colour scale. Padding is left out.

    With ``image`` (or ``query``), the attention from position ``query`` (the batch's own index;
    default the item's last position) to the item's first image's patches is laid over ``image``
    (tile 0) with any further tiles beside it, as :func:`show_saliency` lays saliency.

    ``cache_or_pattern``: the cache of ``vlm.run_with_cache(batch)`` (``cache["pattern", layer]``) or
    a pattern tensor ``[batch, head, query, key]`` (or ``[batch, query, key]``, e.g.
    ``head_summed_norms``; ``label`` names what it holds). Returns a matplotlib figure; its axes are
    labelled ``"pattern"`` (or ``"head {h}"``) and ``"image tile {t}"``.

    Example:
        >>> logits, cache = vlm.run_with_cache(batch)  # doctest: +SKIP
        >>> show_attention(vlm, cache, batch, item=0, layer=2, head=1, image=images[0])  # doctest: +SKIP
        >>> show_attention(vlm, cache, batch, item=0, layer=2, per_head=True)  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if vlm is not None and layer is not None:
        check_blocks(vlm.cfg.n_layers, [layer], "show_attention")
    pattern = attention_pattern(cache_or_pattern, layer)[item]
    one_map = pattern.dim() == 2
    if one_map:
        if head is not None or per_head:
            raise ValueError("This pattern has no head dimension ([batch, query, key]).")
        pattern = pattern[None]
    real = batch.attention_mask[item].bool().cpu()
    if pattern.shape[-1] != real.shape[0]:
        raise ValueError(f"The pattern has {pattern.shape[-1]} positions; the batch {real.shape[0]}.")
    n_heads = pattern.shape[0]
    if head is not None and not -n_heads <= head < n_heads:
        raise ValueError(f"Head {head} out of range: the pattern has {n_heads} heads.")
    modalities = position_modalities(batch, item)
    labels = None
    if vlm is not None:  # the tokens as TransformerLens reads them, image slots as <img{i}:{k}>
        labels = [t for t, r in zip(vlm.to_str_tokens(batch, index=item), real.tolist()) if r]
    where = f"L{layer}" if layer is not None else "pattern"

    def one(h: int | None) -> np.ndarray:
        chosen = pattern.mean(0) if h is None else pattern[h]
        return chosen[real][:, real].numpy()

    maps = {h: one(h) for h in range(n_heads)} if per_head else {head: one(head)}
    with_image = image is not None or query is not None
    if query is None:
        query = int(batch.last_positions[item])
    if with_image and not real[query]:
        raise ValueError(f"Position {query} is padding in item {item}.")
    grids = (
        attention_grids(batch, item, (pattern.mean(0) if head is None else pattern[head])[query])
        if with_image
        else {}
    )

    side = 5.5 if not per_head else 2.6 * int(np.ceil(np.sqrt(len(maps))))
    fig = plt.figure(figsize=(side + 4.2 * len(grids), side + 0.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[side, 4.2 * len(grids)]) if grids else (fig, None)
    vmax = max(float(m.max()) for m in maps.values()) or 1.0
    if per_head:
        cols = int(np.ceil(np.sqrt(len(maps))))
        axes = left.subplots(int(np.ceil(len(maps) / cols)), cols, squeeze=False).flatten()
        for ax in axes[len(maps) :]:
            ax.set_visible(False)
        for ax, (h, matrix) in zip(axes, maps.items()):
            shown, top = _attention_panel(ax, matrix, modalities, None, vmax, max_labels)
            ax.set_label(f"head {h}")
            top.set_title(f"{where}H{h}", fontsize=8)
        left.colorbar(shown, ax=axes[: len(maps)].tolist(), label=label, shrink=0.8)
    else:
        ax = left.subplots()
        shown, top = _attention_panel(ax, maps[head], modalities, labels, vmax, max_labels)
        ax.set_label("pattern")
        if grids:  # the query whose attention is laid over the image
            from matplotlib.patches import Rectangle

            row = int(real[:query].sum())
            ax.add_patch(Rectangle((-0.5, row - 0.5), len(maps[head]), 1, fill=False, ec="tab:red", lw=1.2))
        top.set_title(
            f"{where}H{head}"
            if head is not None
            else where
            if one_map
            else f"{where}, mean of {n_heads} heads",
            fontsize=10,
        )
        left.colorbar(shown, ax=ax, label=label, shrink=0.8)
    _modality_legend(fig, modalities)
    if grids:
        slots = batch.image_slots[item][0]
        picture = seen_part(vlm, image) if image is not None and slots.spatial else None
        high = max(float(np.nanmax(g)) for g in grids.values()) or 1.0
        tiles = right.subplots(1, len(grids), squeeze=False)[0]
        for ax, (tile, grid) in zip(tiles, grids.items()):
            if tile == 0 and picture is not None:
                ax.imshow(picture)
                overlay = ax.imshow(
                    on_image(grid, picture.size), alpha=alpha, cmap="viridis", vmin=0, vmax=high
                )
                ax.set_title(f"from position {query}, on the image", fontsize=9)
            else:
                overlay = ax.imshow(grid, cmap="viridis", vmin=0, vmax=high)
                ax.set_title(f"tile {tile}" if tile else f"from position {query}", fontsize=9)
            ax.set_label(f"image tile {tile}")
            ax.set_xticks([])
            ax.set_yticks([])
        right.colorbar(overlay, ax=tiles.tolist(), label=f"{label} to the image's patches", shrink=0.8)
    return fig


__all__ = [
    "seen_part",
    "MODALITY_COLOURS",
    "attention_grids",
    "attention_pattern",
    "item_values",
    "lens_token_grids",
    "on_image",
    "position_modalities",
    "show_attention",
    "show_lens_grid",
    "show_patching",
    "show_saliency",
    "tile_grids",
]
