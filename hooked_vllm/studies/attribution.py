"""Attribution patching (Nanda 2023; Syed, Rager, Conmy 2023): the linear estimate of what patching
each clean activation into the corrupted run would do to a metric,

    estimate[l, b, p] = (clean[l, b, p] - corrupt[l, b, p]) . d metric / d corrupt[l, b, p],

for every layer's ``blocks.{l}.hook_{kind}`` and position at once: one forward of the clean batch
(no gradient), one forward and one backward of the corrupted batch. The clean and corrupted batches
must share their layout (same prompts and image-token counts), as activation patching needs.

This is the core of study 4 (issue 29); the study's run, command and report are not built yet.

Example:
    >>> metric = lambda logits: logit_diff(corrupt, answer, other)(logits).sum()  # doctest: +SKIP
    >>> estimate = attribution_patching(vlm, clean, corrupt, metric)  # doctest: +SKIP
    >>> estimate.shape  # [layer, batch, pos]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hooked_vllm.interventions.patching import patch_hook


def attribution_patching(
    vlm, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor], kind: str = "resid_pre"
) -> torch.Tensor:
    """``[layer, batch, pos]`` gradient estimates of patching ``clean``'s ``hook_{kind}`` activations
    into ``corrupt`` (``metric``: logits -> a scalar, e.g. a summed logit difference)."""
    clean, corrupt = vlm.to_batch(clean), vlm.to_batch(corrupt)
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(vlm.cfg.n_layers)]
    with torch.no_grad():
        _, clean_cache = vlm.run_with_cache(clean, names_filter=lambda name: name in names)
    acts: dict[str, torch.Tensor] = {}

    def keeper(name: str):  # keyed by the name asked for (the hook reports its canonical alias)
        def keep(act: torch.Tensor, hook) -> torch.Tensor:
            if not acts:  # the first hook is the root of the graph: every later activation depends on it
                act = act.detach().requires_grad_(True)
            else:
                act.retain_grad()
            acts[name] = act
            return act

        return keep

    parameters = [p for p in vlm.hf_model.parameters() if p.requires_grad]
    for parameter in parameters:  # gradients of the activations only, none of the weights
        parameter.requires_grad_(False)
    try:
        with torch.enable_grad(), vlm.hooks(fwd_hooks=[(name, keeper(name)) for name in names]):
            metric(vlm(corrupt)).backward()
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
    return torch.stack(
        [((clean_cache[name] - acts[name].detach()) * acts[name].grad).sum(-1) for name in names]
    ).detach()


def activation_patching(
    vlm, clean, corrupt, metric: Callable[[torch.Tensor], torch.Tensor], kind: str = "resid_pre"
) -> torch.Tensor:
    """``[layer, pos]`` the real effect on ``metric`` of patching ``clean``'s ``hook_{kind}`` at one
    layer and one position (every item of the batch at once) into ``corrupt``: ``metric(patched) -
    metric(corrupt)``, one forward per layer and position (what :func:`attribution_patching` estimates,
    summed over the batch's items)."""
    clean, corrupt = vlm.to_batch(clean), vlm.to_batch(corrupt)
    names = [f"blocks.{layer}.hook_{kind}" for layer in range(vlm.cfg.n_layers)]
    with torch.no_grad():
        _, clean_cache = vlm.run_with_cache(clean, names_filter=lambda name: name in names)
        base = metric(vlm(corrupt))
        n = corrupt.input_ids.shape[1]
        effect = torch.zeros(len(names), n)
        for layer, name in enumerate(names):
            for position in range(n):
                where = torch.zeros(len(corrupt), n, dtype=torch.bool)
                where[:, position] = True
                patched = vlm.run_with_hooks(
                    corrupt, fwd_hooks=[(name, patch_hook(clean_cache[name], where))]
                )
                effect[layer, position] = metric(patched) - base
    return effect
