"""Activation patching by modality: copy a hook's activation from a source run into a target run at
the positions of one token group, layer by layer, and measure the output.

Typical pairs: one prompt with two images (Winoground's swapped pairs), or one image with two
captions. Patched groups must sit at the same positions in both runs (same prompt layout); image
counts that differ are refused.

Example:
    >>> result = patch_by_modality(vlm, source=clean, target=corrupt,
    ...                            metric=logit_diff(corrupt, red, blue))  # doctest: +SKIP
    >>> result.effects.shape  # [layer, group]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
import torch

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.interventions.knockout import Group, group_mask
from hooked_vllm.model.layers import check_blocks

#: Hooks patchable per layer, by their short name.
LAYER_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "z": "blocks.{layer}.attn.hook_z",
}


class PatchingError(HookedVLMError):
    """Source and target runs cannot be patched into each other."""


@dataclass
class PatchingResult:
    effects: torch.Tensor  # [layer, group]
    layers: list[int]
    groups: list[str]
    clean: float  # metric of the source run
    corrupt: float  # metric of the unpatched target run
    hook: str

    def figure(self) -> go.Figure:
        fig = go.Figure(
            go.Heatmap(
                z=self.effects.T.numpy(), x=self.layers, y=self.groups, colorscale="RdBu", zmid=self.corrupt
            )
        )
        fig.update_layout(
            title=f"Patching {self.hook} from source into target (metric; clean {self.clean:.3f}, "
            f"corrupt {self.corrupt:.3f})",
            xaxis_title="layer",
            yaxis_title="patched positions",
        )
        return fig


def patch_hook(
    source: torch.Tensor, positions: torch.Tensor, head: int | None = None
) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """A hook replacing the activation at ``positions`` ([batch, pos] mask) with ``source``'s.

    It acts on forwards over the prompt; decoding steps of cached generation (one new position,
    not among ``positions``) pass unchanged.
    """

    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        if activation.shape[1] != positions.shape[1]:
            return activation
        mask = positions.to(activation.device)
        patched = activation.clone()
        if head is None:
            patched[mask] = source.to(activation.device, activation.dtype)[mask]
        else:  # hook_z: [batch, pos, head, d_head]
            patched[mask, head] = source.to(activation.device, activation.dtype)[mask, head]
        return patched

    return hook


def _check_compatible(source, target, groups: Sequence[Group]) -> None:
    if source.input_ids.shape != target.input_ids.shape:
        raise PatchingError(
            f"Source and target have different shapes {tuple(source.input_ids.shape)} vs "
            f"{tuple(target.input_ids.shape)}. Patch between runs with the same prompt layout "
            "(same template, same number of images and tokens)."
        )
    if not torch.equal(source.image_mask, target.image_mask):
        n_source, n_target = int(source.image_mask.sum()), int(target.image_mask.sum())
        raise PatchingError(
            f"Source and target have image tokens at different positions ({n_source} vs {n_target} image "
            "tokens). Use the same number of images per prompt, in the same places."
        )
    for group in groups:
        if isinstance(group, str) and not torch.equal(group_mask(source, group), group_mask(target, group)):
            raise PatchingError(
                f"The {group!r} positions differ between source and target; patch prompts whose "
                f"{group} tokens line up (e.g. the same caption length), or pass explicit masks."
            )


@torch.no_grad()
def patch_by_modality(
    vlm,
    source,
    target,
    metric: Callable[[torch.Tensor], torch.Tensor],
    *,
    hook: str = "resid_post",
    layers: Sequence[int] | None = None,
    groups: Sequence[Group] = ("image", "text", "last"),
    head: int | None = None,
) -> PatchingResult:
    """Patch ``hook`` from ``source`` into ``target`` at each group's positions, one layer at a time.

    ``hook`` is a short name in :data:`LAYER_HOOKS` or ``"visual_prefix"`` (no layer; image group only).
    ``head`` selects one head for ``hook="z"``. Returns the metric (mean over items) per layer and group.
    """
    source, target = vlm.to_batch(source), vlm.to_batch(target)
    _check_compatible(source, target, groups)
    group_names = [g if isinstance(g, str) else f"mask{i}" for i, g in enumerate(groups)]
    if hook == "visual_prefix":
        if head is not None or any(g != "image" for g in groups):
            raise PatchingError("hook_visual_prefix lives only at image positions: use groups=('image',).")
        _, cache = vlm.run_with_cache(source, names_filter="hook_visual_prefix")
        logits = vlm.run_with_hooks(
            target, fwd_hooks=[("hook_visual_prefix", lambda x, hook: cache["hook_visual_prefix"])]
        )
        value = metric(logits).mean()
        return PatchingResult(
            value.reshape(1, 1).cpu(),
            [0],
            ["image"],
            float(metric(vlm(source)).mean()),
            float(metric(vlm(target)).mean()),
            hook,
        )
    if hook not in LAYER_HOOKS:
        raise PatchingError(f"Unknown hook {hook!r}; choose from {sorted(LAYER_HOOKS)} or 'visual_prefix'.")
    n_layers = vlm.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else check_blocks(n_layers, layers, "patch_by_modality")
    names = [LAYER_HOOKS[hook].format(layer=layer) for layer in layers]
    clean_logits, cache = vlm.run_with_cache(source, names_filter=names)
    effects = torch.zeros(len(layers), len(groups))
    for i, name in enumerate(names):
        for j, group in enumerate(groups):
            positions = group_mask(target, group)
            logits = vlm.run_with_hooks(target, fwd_hooks=[(name, patch_hook(cache[name], positions, head))])
            effects[i, j] = metric(logits).mean()
    return PatchingResult(
        effects,
        layers,
        group_names,
        float(metric(clean_logits).mean()),
        float(metric(vlm(target)).mean()),
        hook,
    )
