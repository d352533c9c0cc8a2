"""The figure of :mod:`hooked_vllm.analysis.routing`: which experts image and text tokens go to.

Example:
    >>> from hooked_vllm.analysis.routing import expert_routing  # doctest: +SKIP
    >>> fig = show_expert_routing(expert_routing(vlm, batch))  # doctest: +SKIP
    >>> fig.savefig("routing.png")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hooked_vllm.analysis.routing import ExpertRouting


def show_expert_routing(routing: ExpertRouting, *, annotate: bool | None = None) -> Any:
    """Layer x expert heatmaps of each modality's routing distribution
    (:attr:`~hooked_vllm.analysis.routing.ExpertRouting.fractions`: the share of the modality's
    routing choices that went to each expert, per layer), side by side on one colour scale, then
    the first two modalities' difference (image minus text by default) on a diverging scale. Cells
    are written on small grids (``annotate``). Returns a matplotlib figure."""
    import matplotlib.pyplot as plt

    fractions = routing.fractions.float().numpy()  # [layer, modality, expert]
    n_layers, n_modalities, n_experts = fractions.shape
    annotate = annotate if annotate is not None else n_layers * n_experts <= 96
    panels = [(name, fractions[:, m]) for m, name in enumerate(routing.modalities)]
    difference = None
    if n_modalities >= 2:
        first, second = routing.modalities[:2]
        difference = (f"{first} - {second}", fractions[:, 0] - fractions[:, 1])
    n_panels = len(panels) + (difference is not None)
    width = min(2.2 + 0.35 * n_experts, 7.0)
    fig, axes = plt.subplots(
        1, n_panels, figsize=(width * n_panels, 1.6 + 0.4 * n_layers), layout="constrained", squeeze=False
    )
    axes = axes[0]
    top = float(np.nanmax(fractions)) if np.isfinite(fractions).any() else 1.0
    for ax, (name, values) in zip(axes, panels, strict=False):
        shown = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=top or 1.0, aspect="auto")
        tokens = int(routing.tokens[routing.modalities.index(name)])
        _axes(ax, f"{name} tokens ({tokens})", routing.layers, n_experts)
        if annotate:
            _write(ax, values, lambda v: v < 0.5 * top)  # viridis is dark at its low end
    fig.colorbar(
        shown, ax=list(axes[: len(panels)]), label="share of the modality's routing choices", shrink=0.9
    )
    if difference is not None:
        name, values = difference
        span = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
        span = span or 1.0
        ax = axes[-1]
        shown = ax.imshow(values, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        _axes(ax, name, routing.layers, n_experts)
        if annotate:
            _write(ax, values, lambda v: abs(v) > 0.6 * span)
        fig.colorbar(shown, ax=ax, label="difference of shares", shrink=0.9)
    fig.suptitle("expert routing by modality", fontsize=10)
    return fig


def _axes(ax: Any, title: str, layers: tuple[int, ...], n_experts: int) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(n_experts) if n_experts <= 32 else np.linspace(0, n_experts - 1, 9).astype(int))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")


def _write(ax: Any, values: np.ndarray, dark: Any) -> None:
    for (r, c), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(
                c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if dark(value) else "k"
            )
