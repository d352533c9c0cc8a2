"""Attribution patching (Nanda 2023; Syed, Rager, Conmy 2023): the linear estimate of what patching
each clean activation into the corrupted run would do to a metric,

    estimate[l, b, p] = (clean[l, b, p] - corrupt[l, b, p]) . d metric / d corrupt[l, b, p],

for every layer's hook of a kind (``resid_pre``, ``attn_out``, ``mlp_out``; ``z`` per head) and every
position at once: one forward of the clean batch (no gradient), one forward and one backward of the
corrupted batch, for every kind together. The clean and corrupted batches must share their layout
(same prompts and image-token counts), as activation patching needs.

Beside it, real activation patching (:func:`patch_effects`): the clean activation put into the
corrupted run where a boolean mask says (a position group at one layer, or one cell), one forward
per patch, the metric's change read per item. The study built from both is
:mod:`hooked_vllm.studies.attribution_study`.

Example:
    >>> metric = lambda logits: logit_diff(corrupt, answer, other)(logits).sum()  # doctest: +SKIP
    >>> estimate = attribution_patching(vlm, clean, corrupt, metric)  # doctest: +SKIP
    >>> estimate.shape  # [layer, batch, pos]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float

from hooked_vllm.errors import HookedVLMError
from hooked_vllm.interventions.patching import LAYER_HOOKS, patch_hook
from hooked_vllm.studies.params import ATTRIBUTION_KINDS as KINDS

#: every gradient's graph starts here: each hook of every kind depends on block 0's input
ROOT = "blocks.0.hook_resid_pre"


def hook_names(vlm, kind: str) -> list[str]:
    """``blocks.{l}.hook_{kind}`` (``blocks.{l}.attn.hook_z``) of every block, in order."""
    if kind not in KINDS:
        raise HookedVLMError(f"Unknown hook kind {kind!r} for attribution patching; choose from {KINDS}.")
    return [LAYER_HOOKS[kind].format(layer=layer) for layer in range(vlm.cfg.n_layers)]


@dataclass
class GradientRun:
    """The corrupted run's logits, and per hook name its activation and the metric's gradient."""

    logits: Float[torch.Tensor, "batch pos vocab"]
    acts: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]


def clean_run(vlm, clean, names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clean batch's logits and its activations at ``names`` (no gradient)."""
    wanted = set(names)
    with torch.no_grad():
        logits, cache = vlm.run_with_cache(vlm.to_batch(clean), names_filter=lambda name: name in wanted)
    return logits, {name: cache[name] for name in names}


def gradient_run(
    vlm, corrupt, names: Sequence[str], metric: Callable[[torch.Tensor], torch.Tensor]
) -> GradientRun:
    """One forward of ``corrupt`` keeping the activations at ``names``, and one backward of
    ``metric(logits).sum()`` giving their gradients (of the activations only: the weights' are not
    taken, and every weight's ``requires_grad`` is left as it was)."""
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):  # keyed by the name asked for (the hook reports its canonical alias)
        def keep(act: torch.Tensor, hook) -> torch.Tensor:
            if name == ROOT:  # a leaf: every later activation depends on it
                act = act.detach().requires_grad_(True)
            elif not act.requires_grad:
                raise HookedVLMError(
                    f"{name} does not depend on {ROOT} in this model: attribution patching cannot "
                    "take its gradient. Choose another hook kind."
                )
            else:  # a new tensor object, so that a hook point that writes back only a changed
                # value (transformer-lens's AltUp block, Gemma 3n: an identity check) puts this one
                # in the graph; a bare view of its stack would get no gradient
                act = act.view_as(act)
                act.retain_grad()
            acts[name] = act
            return act

        return keep

    hooked = [ROOT, *(name for name in names if name != ROOT)]
    parameters = [p for p in vlm.hf_model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad(), vlm.hooks(fwd_hooks=[(name, keeper(name)) for name in hooked]):
            logits = vlm(vlm.to_batch(corrupt))
            missing = [name for name in names if name not in acts]
            if missing:
                raise HookedVLMError(
                    f"{missing[0]} did not fire on this model: attribution patching needs every "
                    "block's hook of the kind asked for. Choose another hook kind."
                )
            metric(logits).sum().backward()
            ungraded = [name for name in names if acts[name].grad is None]
            if ungraded:
                raise HookedVLMError(
                    f"{ungraded[0]} got no gradient: the value its hook sees is not the one this model "
                    "carries on, so attribution patching cannot estimate there. Choose another hook kind."
                )
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
    return GradientRun(
        logits.detach(),
        {name: acts[name].detach() for name in names},
        {name: acts[name].grad for name in names},
    )


def estimates(
    clean_acts: Mapping[str, torch.Tensor], run: GradientRun, names: Sequence[str]
) -> Float[torch.Tensor, "layer batch pos *head"]:
    """(clean - corrupt) . gradient at each of ``names`` (summed over the last dimension: ``d_model``,
    or ``d_head`` for ``z``, which keeps its heads)."""
    return torch.stack(
        [((clean_acts[name].to(run.acts[name]) - run.acts[name]) * run.grads[name]).sum(-1) for name in names]
    )


def attribution_patching(
    vlm, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor], kind: str = "resid_pre"
) -> Float[torch.Tensor, "layer batch pos *head"]:
    """``[layer, batch, pos]`` (``z``: ``[layer, batch, pos, head]``) gradient estimates of patching
    ``clean``'s ``hook_{kind}`` activations into ``corrupt`` (``metric``: logits -> one value per item
    or a scalar, e.g. a logit difference; it is summed)."""
    names = hook_names(vlm, kind)
    _, clean_acts = clean_run(vlm, clean, names)
    return estimates(clean_acts, gradient_run(vlm, corrupt, names, metric), names)


def mask_patch_hook(source: torch.Tensor, where: torch.Tensor) -> Callable:
    """A hook putting ``source`` in where ``where`` (the activation's leading dimensions: ``[batch,
    pos]``, or ``[batch, pos, head]`` for ``z``) is True; other activations pass unchanged."""

    def hook(activation: torch.Tensor, hook) -> torch.Tensor:
        if activation.shape[: where.dim()] != where.shape:
            return activation
        mask = where.to(activation.device).reshape(*where.shape, *[1] * (activation.dim() - where.dim()))
        return torch.where(mask, source.to(activation.device, activation.dtype), activation)

    return hook


@torch.no_grad()
def patch_effects(
    vlm,
    clean_acts: Mapping[str, torch.Tensor],
    corrupt,
    metric: Callable[[torch.Tensor], torch.Tensor],
    patches: Sequence[Mapping[str, Bool[torch.Tensor, "batch pos *head"]]],
    base: torch.Tensor,
) -> Float[torch.Tensor, "patch batch"]:
    """Real activation patching: per patch (hook name -> where to put the clean activation), one
    forward of ``corrupt`` and ``metric(patched) - base`` per item (``base``: the unpatched metric)."""
    corrupt = vlm.to_batch(corrupt)
    effects = []
    for patch in patches:
        hooks = [(name, mask_patch_hook(clean_acts[name], where)) for name, where in patch.items()]
        effects.append(metric(vlm.run_with_hooks(corrupt, fwd_hooks=hooks)).float().cpu() - base)
    return torch.stack(effects) if effects else torch.zeros(0, len(corrupt))


def activation_patching(
    vlm, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor], kind: str = "resid_pre"
) -> torch.Tensor:
    """``[layer, pos]`` the real effect on ``metric`` (summed over the batch's items) of patching
    ``clean``'s ``hook_{kind}`` at one layer and one position (every item at once) into ``corrupt``,
    one forward per layer and position: every cell :func:`attribution_patching` estimates."""
    clean, corrupt = vlm.to_batch(clean), vlm.to_batch(corrupt)
    names = hook_names(vlm, kind)
    _, clean_acts = clean_run(vlm, clean, names)
    with torch.no_grad():
        base = metric(vlm(corrupt)).sum()
    n = corrupt.input_ids.shape[1]
    effect = torch.zeros(len(names), n)
    with torch.no_grad():
        for layer, name in enumerate(names):
            for position in range(n):
                where = torch.zeros(len(corrupt), n, dtype=torch.bool)
                where[:, position] = True
                patched = vlm.run_with_hooks(corrupt, fwd_hooks=[(name, patch_hook(clean_acts[name], where))])
                effect[layer, position] = metric(patched).sum() - base
    return effect


# ---------------------------------------------------------------- agreement
def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as Spearman's correlation needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    out = np.empty(len(values))
    out[order] = average[group]
    return out


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float | int | None]:
    """Pearson's and Spearman's correlation of ``x`` and ``y`` (``None`` with fewer than 3 points or
    a constant side), and their count ``n``."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "spearman": None, "n": len(x)}
    return {
        "pearson": float(np.corrcoef(x, y)[0, 1]),
        "spearman": float(np.corrcoef(ranks(x), ranks(y))[0, 1]),
        "n": len(x),
    }
