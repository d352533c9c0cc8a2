"""Visual-token pruning (FastV-style; the paper's future work): from layer K on, only k image tokens
remain readable, chosen by norm-based saliency, plain attention, first-k or at random.

Pruned image tokens are removed as *keys* from layer K on (their attention scores are set to the
dtype's minimum for every query). Every other position then computes exactly what it would if the
pruned tokens were dropped from the sequence, so fidelity numbers are those of dropping; the compute
a drop would save is reported analytically (token-layers removed from the linear layers).

In layers with no attention pattern (Qwen3.5's linear attention, LFM2's short convolution) pruned
tokens are removed as HF removes padding there: their input to the layer's token mixer is zeroed
(``blocks.{l}.linear_attn.hook_in``, ``blocks.{l}.conv.hook_in``), so nothing of them enters the
convolution or the recurrent state. That is not quite a drop: the convolution still sees a zero in
their slot and the state decays at their step, but no information of a pruned token reaches another
position.

``select_image_tokens`` by ``norm`` or ``attention`` reads the last layer with an attention pattern
before the pruning starts.

Example:
    >>> keep = select_image_tokens(vlm, batch, k=64, method="norm", layer=2)  # doctest: +SKIP
    >>> with prune(vlm, batch, keep, from_layer=2):  # doctest: +SKIP
    ...     logits = vlm(batch)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool

from hooked_vllm.analysis.norm_attention import head_summed_norms
from hooked_vllm.errors import LayerError
from hooked_vllm.interventions.knockout import delegated_attention_layers, masks_edited
from hooked_vllm.model.layers import attention_w_o, check_blocks

METHODS = ("norm", "attention", "first", "random")


class PruningApproximationWarning(UserWarning):
    """Pruning on a model with layers without attention (linear attention, convolutions) zeroes the
    pruned tokens' input there instead of dropping them: close to a drop, not equal."""


@torch.no_grad()
def select_image_tokens(
    vlm, batch, k: int, method: str = "norm", layer: int = 1, seed: int = 0
) -> Bool[torch.Tensor, "batch pos"]:
    """The ``k`` image positions per item to keep.

    ``norm``/``attention``: the most salient image tokens for the last position at ``layer - 1``
    (head-summed norm-based attention, or head-mean attention weight), i.e. what is known before
    pruning starts at ``layer`` (where ``layer - 1`` has no attention pattern: the last layer before
    ``layer`` that has one; at ``layer`` 0, the first). ``first``: the first k. ``random``: k at
    random (seeded).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {METHODS}.")
    check_blocks(vlm.cfg.n_layers, [layer], "select_image_tokens(layer=...)")
    batch = vlm.to_batch(batch)
    image = batch.image_mask
    if method in ("norm", "attention"):
        with_pattern = vlm.adapter.attention_layers
        before = [source for source in with_pattern if source < layer]
        if not before and layer > 0:
            raise LayerError(
                f"select_image_tokens(method={method!r}, layer={layer}): no layer before {layer} has an "
                f"attention pattern (those with one: {list(with_pattern)}); prune from a later layer "
                "or select by 'first' or 'random'."
            )
        source = before[-1] if before else with_pattern[0]
        names = [f"blocks.{source}.attn.hook_pattern", vlm.adapter.value_hooks()[source]]
        _, cache = vlm.run_with_cache(batch, names_filter=names)
        pattern = cache[names[0]]
        scores = (
            head_summed_norms(pattern, cache[names[1]], attention_w_o(vlm.blocks[source].attn))
            if method == "norm"
            else pattern.mean(1)
        )
        saliency = scores[torch.arange(len(batch)), batch.last_positions].float().cpu()
    elif method == "first":
        saliency = -torch.arange(image.shape[1], dtype=torch.float).expand(image.shape).clone()
    else:
        saliency = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed))
    saliency = saliency.masked_fill(~image, float("-inf"))
    keep = torch.zeros_like(image)
    k_eff = min(k, int(image.sum(-1).min()))
    if k_eff > 0:
        keep.scatter_(1, saliency.topk(k_eff, dim=-1).indices, True)
    return keep & image


def pruning_hooks(
    batch,
    keep: torch.Tensor,
    from_layer: int,
    n_layers: int,
    attention_layers: tuple[int, ...] | None = None,
    mixer: str = "linear_attn",
) -> list:
    """Hooks removing the pruned image tokens as keys in layers ``from_layer..n_layers-1`` (the
    ``attention_layers`` among them; default all), and zeroing their input to the others' token
    mixer (``blocks.{l}.<mixer>``: linear attention, a convolution), for the prompt forward and every
    cached decoding step."""
    pruned = batch.image_mask & ~keep  # [batch, prompt]
    if attention_layers is None:
        attention_layers = tuple(range(n_layers))

    def zero_pruned(hidden: torch.Tensor, hook) -> torch.Tensor | None:
        if hidden.shape[1] != pruned.shape[1]:  # a decoding step: no pruned token in it
            return None
        return hidden.masked_fill(pruned[..., None].to(hidden.device), 0.0)

    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        columns = torch.zeros(scores.shape[0], scores.shape[-1], dtype=torch.bool, device=scores.device)
        n = min(pruned.shape[1], scores.shape[-1])
        columns[:, :n] = pruned[:, :n].to(scores.device)
        return scores.masked_fill(columns[:, None, None, :], torch.finfo(scores.dtype).min)

    return [
        (f"blocks.{layer}.attn.hook_attn_scores", hook)
        if layer in attention_layers
        else (f"blocks.{layer}.{mixer}.hook_in", zero_pruned)
        for layer in range(from_layer, n_layers)
    ]


@contextmanager
def prune(vlm, batch, keep: torch.Tensor, from_layer: int):
    """Context manager: only ``keep``'s image tokens are readable from ``from_layer`` on."""
    check_blocks(vlm.cfg.n_layers, [from_layer], "prune(from_layer=...)")
    batch = vlm.to_batch(batch)
    attention_layers = vlm.adapter.attention_layers
    # Gemma 4: attention delegated to HF, whose mask loses the pruned keys instead of its scores
    delegated = delegated_attention_layers(vlm, [layer for layer in attention_layers if layer >= from_layer])
    scored = tuple(layer for layer in attention_layers if layer not in delegated)
    pruned = batch.image_mask & ~keep
    later = range(from_layer, vlm.cfg.n_layers)
    without_pattern = [layer for layer in later if layer not in attention_layers]
    if without_pattern and bool(pruned.any()):
        warnings.warn(
            f"Pruning through {len(without_pattern)} layer(s) without attention "
            f"({vlm.adapter.mixer_without_pattern}: blocks {', '.join(map(str, without_pattern))}): "
            "there the pruned tokens' input is zeroed, not dropped (the recurrent state still decays and "
            "the convolution still sees their slots), so the result is close to dropping them, not equal "
            "(tiny Qwen3.5/-MoE: up to 4.3e-3 in the answer's probability, about half the pruning effect).",
            PruningApproximationWarning,
            stacklevel=3,
        )
    hooks = [
        (name, hook)
        for name, hook in pruning_hooks(
            batch, keep, from_layer, vlm.cfg.n_layers, scored, vlm.adapter.mixer_without_pattern
        )
        if int(name.split(".")[1]) not in delegated
    ]

    def edit(mask: torch.Tensor) -> torch.Tensor:
        columns = torch.zeros(mask.shape[0], mask.shape[-1], dtype=torch.bool, device=mask.device)
        n = min(pruned.shape[1], mask.shape[-1])
        columns[:, :n] = pruned[:, :n].to(mask.device)
        return mask.masked_fill(columns[:, None, None, :], torch.finfo(mask.dtype).min)

    with vlm.hooks(fwd_hooks=hooks), masks_edited(vlm, delegated, edit):
        yield vlm


def compute_saved(batch, keep: torch.Tensor, from_layer: int, n_layers: int) -> float:
    """Fraction of token-layers a drop would remove: (pruned tokens x layers after K) / (tokens x layers)."""
    pruned = (batch.image_mask & ~keep).sum(-1).float()
    tokens = batch.attention_mask.sum(-1).float()
    return float((pruned * (n_layers - from_layer) / (tokens * n_layers)).mean())


@dataclass
class PruningPoint:
    k: int
    from_layer: int
    method: str
    top1_agreement: float
    kl: float
    caption_agreement: float | None
    compute_saved: float


@torch.no_grad()
def pruning_curve(
    vlm,
    batch,
    ks: Sequence[int],
    from_layers: Sequence[int],
    method: str = "norm",
    max_new_tokens: int = 0,
    seed: int = 0,
) -> list[PruningPoint]:
    """Fidelity against the unpruned run for every (k, K): next-token top-1 agreement and KL at the
    last position, and (with ``max_new_tokens``) the fraction of greedy continuations that are identical."""
    batch = vlm.to_batch(batch)
    rows = torch.arange(len(batch))
    reference = vlm(batch)[rows, batch.last_positions].float().log_softmax(-1)
    reference_text = vlm.generate(batch, max_new_tokens) if max_new_tokens else None
    points = []
    for from_layer in from_layers:
        for k in ks:
            keep = select_image_tokens(vlm, batch, k, method, from_layer, seed)
            with prune(vlm, batch, keep, from_layer):
                logits = vlm(batch)[rows, batch.last_positions].float().log_softmax(-1)
                text = vlm.generate(batch, max_new_tokens) if max_new_tokens else None
            kl = (reference.exp() * (reference - logits)).sum(-1).mean()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
            captions = None
            if text is not None:
                length = min(text.shape[1], reference_text.shape[1])
                captions = float((text[:, :length] == reference_text[:, :length]).all(-1).float().mean())
            points.append(
                PruningPoint(
                    k,
                    from_layer,
                    method,
                    float(agree),
                    float(kl),
                    captions,
                    compute_saved(batch, keep, from_layer, vlm.cfg.n_layers),
                )
            )
    return points
