"""Plotly figures of the aggregates (one function per figure, aggregates dict in, figure out).

Layer numbers are TransformerLens's block indices. The residual stream at layer l is what block l
reads (``blocks.{l}.hook_resid_pre``, HF's ``hidden_states[l]``): layer 0 is the embedding and
layer L the final stream after the last block. Attention at layer l is block l's attention (0 to
L-1). Stream figures (the phase diagram, the logit lens) run from 0 to L; attention figures (by
modality pair, saliency) from 0 to L-1, index l of their arrays being block l.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

CURVES = {
    "intra_image": ("intra-image", "#1f77b4"),
    "intra_text": ("intra-text", "#2ca02c"),
    "inter": ("inter-modal", "#d62728"),
}
PHASE_COLOURS = [
    "rgba(255,200,0,0.12)",
    "rgba(0,150,255,0.10)",
    "rgba(220,0,80,0.10)",
    "rgba(120,120,120,0.12)",
]


def _band(x, mean, ci, name, colour, dash=None):
    mean, ci = np.asarray(mean, dtype=float), np.asarray(ci, dtype=float)
    line = go.Scatter(x=x, y=mean, name=name, mode="lines+markers", line={"color": colour, "dash": dash})
    band = go.Scatter(
        x=np.r_[x, x[::-1]],
        y=np.r_[mean + ci, (mean - ci)[::-1]],
        fill="toself",
        fillcolor=colour,
        opacity=0.15,
        line={"width": 0},
        hoverinfo="skip",
        showlegend=False,
    )
    return [band, line]


def phase_diagram(aggregates: dict, title: str = "Phase diagram") -> go.Figure:
    """Intra-image, intra-text and inter-modal contextualization against depth, with 95% bands and
    the detected phases shaded and labelled (baseline-adjusted when the dataset has >1 item)."""
    ctx = aggregates["contextualization"]
    adjusted = aggregates.get("phases_from") == "adjusted_mean"
    key, ci_key = ("adjusted_mean", "adjusted_ci95") if adjusted else ("mean", "ci95")
    x = np.arange(aggregates["n_layers"] + 1)
    fig = go.Figure()
    for group, (label, colour) in CURVES.items():
        for trace in _band(x, ctx[group][key], ctx[group][ci_key], label, colour):
            fig.add_trace(trace)
    for i, phase in enumerate(aggregates["phases"]):
        if phase["found"]:
            fig.add_vrect(
                x0=phase["start"],
                x1=phase["end"],
                fillcolor=PHASE_COLOURS[i],
                line_width=0,
                annotation_text=f"{'I II III IV'.split()[i]} {phase['name']}",
                annotation_position="top left",
                annotation_font_size=10,
            )
    missing = [p["name"] for p in aggregates["phases"] if not p["found"]]
    subtitle = f"not found: {', '.join(missing)}" if missing else "all four phases found"
    fig.update_layout(
        title=f"{title}<br><sup>{'anisotropy-adjusted ' if adjusted else ''}mean cosine; {subtitle}</sup>",
        xaxis_title="layer (0 = embedding)",
        yaxis_title="contextualization",
        template="plotly_white",
    )
    return fig


def layers_without_attention(aggregates: dict) -> list[int]:
    """The blocks whose attention figures are empty: layers with no attention pattern (Qwen3.5's
    linear attention), where every pair's mean is undefined (NaN, or null read back from JSON)."""
    means = [stats["mean"] for stats in aggregates["norm_attention"].values()]
    return [
        layer
        for layer in range(aggregates["n_layers"])
        if means and all(m[layer] is None or not np.isfinite(m[layer]) for m in means)
    ]


def no_attention_note(aggregates: dict) -> str:
    """A sentence naming the layers with no attention pattern, or ''."""
    missing = layers_without_attention(aggregates)
    if not missing:
        return ""
    return f"no attention pattern at layers {', '.join(map(str, missing))} (linear attention): not drawn"


def attention_by_pair(aggregates: dict) -> go.Figure:
    """Norm-based (solid) and weight-based (dotted) attention by modality pair, per layer (block
    index: layer l is block l's attention; layers with no attention pattern are gaps, named in the
    title)."""
    x = np.arange(aggregates["n_layers"])
    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("norm-based ||sum_h alpha f_h(x)||", "weight alpha (head mean)")
    )
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (pair, stats) in enumerate(aggregates["norm_attention"].items()):
        colour = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=x, y=stats["mean"], name=pair, line={"color": colour}), row=1, col=1)
        weight = aggregates["weight_attention"][pair]["mean"]
        fig.add_trace(
            go.Scatter(x=x, y=weight, name=pair, line={"color": colour, "dash": "dot"}, showlegend=False),
            row=1,
            col=2,
        )
    fig.update_layout(
        title="Attention by modality pair (query <- key), mean over items"
        + (f"<br><sub>{note}</sub>" if (note := no_attention_note(aggregates)) else ""),
        template="plotly_white",
    )
    fig.update_xaxes(title_text="layer (block l's attention)")
    fig.update_yaxes(title_text="head-summed norm, mean over pairs", row=1, col=1)
    fig.update_yaxes(title_text="attention weight, mean over pairs", row=1, col=2)
    return fig


def tile_mosaic(values: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-token values laid out on their images: ``grid[k] = (image, tile, row, col)`` of value k.
    Each (image, tile) becomes a block of its rows x cols, blocks side by side in order of first
    appearance, one empty column between them; cells no token covers are NaN. Returns the 2-D
    array and, per cell, its (image, tile, row, col) (-1 where empty) for hover text."""
    grid = np.asarray(grid, dtype=int).reshape(-1, 4)
    blocks = list(dict.fromkeys(map(tuple, grid[:, :2].tolist())))
    shapes = {b: grid[(grid[:, 0] == b[0]) & (grid[:, 1] == b[1])][:, 2:].max(0) + 1 for b in blocks}
    height = max(int(shape[0]) for shape in shapes.values())
    starts, width = {}, 0
    for b in blocks:
        starts[b] = width
        width += int(shapes[b][1]) + 1
    width -= 1
    z = np.full((height, width), np.nan)
    where = np.full((height, width, 4), -1)
    for value, (image, tile, row, col) in zip(values, grid.tolist()):
        x = starts[(image, tile)] + col
        z[row, x] = value
        where[row, x] = (image, tile, row, col)
    return z, where


def saliency_maps(aggregates: dict, key: str = "saliency_last") -> go.Figure | None:
    """Norm-based saliency each image token receives (from the last position by default), on the
    image grid (the items' own layout of image tokens, tiles side by side, where the run recorded it;
    a square grid when the image tokens form one, as LLaVA's; a bar per token otherwise), with a
    slider over every layer and one colour scale for all of them."""
    if key not in aggregates:
        return None
    maps = np.asarray(aggregates[key])  # [layer, n_image]
    n_layers, n_img = maps.shape
    grid = aggregates.get("saliency_grid")
    side = int(math.isqrt(n_img))
    if grid is None and side * side == n_img:
        grid = [(0, 0, k // side, k % side) for k in range(n_img)]
    scale = {"zmin": float(np.nanmin(maps)), "zmax": float(np.nanmax(maps))}
    fig = go.Figure()
    # Layer numbers as in the attention figure: block l's attention is layer l.
    for layer in range(n_layers):
        if grid is not None:
            z, where = tile_mosaic(maps[layer], grid)
            trace = go.Heatmap(
                z=z,
                customdata=where,
                hovertemplate="image %{customdata[0]}, tile %{customdata[1]}, row %{customdata[2]}, "
                "col %{customdata[3]}, layer " + str(layer) + ": %{z:.3g}<extra></extra>",
                colorscale="Viridis",
                colorbar={"title": {"text": "saliency"}},
                **scale,  # one colour scale for every layer: the bar reads for all of them
            )
        else:
            trace = go.Bar(y=maps[layer], hovertemplate="image token %{x}: %{y:.3g}<extra></extra>")
        trace.visible = layer == n_layers - 1
        trace.name = f"layer {layer}"
        fig.add_trace(trace)
    steps = [
        {
            "method": "update",
            "label": str(layer),
            "args": [{"visible": [other == layer for other in range(n_layers)]}],
        }
        for layer in range(n_layers)
    ]
    source = "the last position" if key == "saliency_last" else "the instruction"
    used, total = aggregates.get("saliency_items"), aggregates.get("n_items")
    over = (
        f"mean over {used} of {total} items (those sharing one image layout)"
        if used and total
        else "mean over items"
    )
    fig.update_layout(
        title=f"Image-token saliency received from {source} (norm-based, {over})",
        template="plotly_white",
        sliders=[{"active": n_layers - 1, "currentvalue": {"prefix": "layer "}, "steps": steps}],
        xaxis_title="image-token column (tiles side by side)" if grid is not None else "image token",
        yaxis_title="image-token row" if grid is not None else "saliency",
    )
    if grid is not None:
        fig.update_yaxes(autorange="reversed")
        fig.update_xaxes(scaleanchor="y", constrain="domain")
    return fig


def lens_convergence(aggregates: dict) -> go.Figure | None:
    """Logit lens at the last position: KL to the final distribution (left axis) and top-1
    agreement (right axis) per layer. Both axes start at 0 on the figure's bottom edge (each is
    non-negative), so the two zeros are one baseline; each reaches 5% above its largest value."""
    lens = aggregates.get("logit_lens")
    if lens is None:
        return None
    kl = np.asarray(lens["kl_to_final"]["mean"], dtype=float)
    agreement = np.asarray(lens["top1_is_final"], dtype=float)
    x = np.arange(len(kl))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=kl, name="KL(final || layer)"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=agreement, name="top-1 = final prediction"), secondary_y=True)
    fig.update_layout(
        title="Logit lens at the last position",
        template="plotly_white",
        xaxis_title="layer (0 = embedding, L = the final stream)",
    )

    def top(values: np.ndarray, at_least: float) -> float:
        finite = values[np.isfinite(values)]
        return 1.05 * max(float(finite.max()) if finite.size else 0.0, at_least)

    fig.update_yaxes(
        title_text="KL(final || layer), nats", range=[0, top(kl, 1e-6)], zeroline=True, secondary_y=False
    )
    fig.update_yaxes(
        title_text="fraction of items whose top-1 = final",
        range=[0, top(agreement, 1.0)],
        tickmode="array",
        tickvals=[0, 0.2, 0.4, 0.6, 0.8, 1.0],
        showgrid=False,
        secondary_y=True,
    )
    return fig
