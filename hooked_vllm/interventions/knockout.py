"""Cross-modal attention knockout (Zhang et al. 2024, "Cross-modal information flow in multimodal
large language models"): block attention edges from one token group to another in a window of layers.

Edges are removed on the attention *scores* before the softmax (set to the dtype's minimum, as the
model's own masks are), so the remaining weights renormalise as the model would.

Edges exist in layers with an attention pattern only (``vlm.adapter.attention_layers``): in a hybrid
model (Qwen3.5) the linear-attention layers' recurrence, which has no edges, runs unchanged, so
information can still flow through them; knockout skips them.

Groups: ``"image"``, ``"text"`` (instruction), ``"special"``, ``"last"`` (each item's last real
position), or an explicit ``[batch, pos]`` boolean mask. An edge ``("image", "text")`` blocks text
*queries* from reading image *keys* (information flowing image -> text).

Example:
    >>> with knockout(vlm, batch, edges=[("image", "last")], layers=range(10, 20)):  # doctest: +SKIP
    ...     logits = vlm(batch)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Bool, Float

from hooked_vllm.errors import LayerError
from hooked_vllm.model.layers import check_blocks

Group = str | torch.Tensor


def group_mask(batch, group: Group) -> Bool[torch.Tensor, "batch pos"]:
    """The ``[batch, pos]`` mask of a named group (or ``group`` itself if it is a mask)."""
    if isinstance(group, torch.Tensor):
        return group.bool()
    if group == "last":
        mask = torch.zeros_like(batch.image_mask)
        mask[torch.arange(len(batch)), batch.last_positions] = True
        return mask
    if group in ("image", "text", "special"):
        return batch.mask(group)
    raise ValueError(
        f"Unknown group {group!r}: use 'image', 'text', 'special', 'last' or a [batch, pos] mask."
    )


def blocked_edges(batch, edges: Sequence[tuple[Group, Group]]) -> Bool[torch.Tensor, "batch query key"]:
    """``[batch, query, key]``: True where the query may not read the key."""
    n = batch.input_ids.shape[1]
    blocked = torch.zeros(len(batch), n, n, dtype=torch.bool)
    for source, target in edges:
        keys, queries = group_mask(batch, source), group_mask(batch, target)
        blocked |= queries[:, :, None] & keys[:, None, :]
    return blocked


def knockout_hooks(
    batch, edges: Sequence[tuple[Group, Group]], layers: Iterable[int]
) -> list[tuple[str, Callable]]:
    """Forward hooks on ``blocks.{l}.attn.hook_attn_scores`` removing ``edges`` in ``layers``.

    They act on forwards over the prompt; decoding steps of cached generation (queries that are
    generated tokens, in no group) pass unchanged.
    """
    blocked = blocked_edges(batch, edges)
    real = batch.attention_mask.bool()

    def hook(scores: torch.Tensor, hook) -> torch.Tensor:
        if scores.shape[-2:] != blocked.shape[-2:]:
            return scores
        scores = scores.masked_fill(blocked[:, None].to(scores.device), torch.finfo(scores.dtype).min)
        warn_if_queries_emptied(scores, real, hook.name)
        return scores

    return [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in layers]


@contextmanager
def knockout(vlm, batch, edges: Sequence[tuple[Group, Group]], layers: Iterable[int] | None = None):
    """Context manager: ``edges`` blocked in ``layers`` (default: all) for every forward inside;
    layers with no attention pattern among them are skipped (their recurrence has no edges)."""
    batch = vlm.to_batch(batch)
    layers = range(vlm.cfg.n_layers) if layers is None else check_blocks(vlm.cfg.n_layers, layers, "knockout")
    layers = [layer for layer in layers if layer in vlm.adapter.attention_layers]
    blocked = blocked_edges(batch, edges)
    real = batch.attention_mask.bool()

    def edit(mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[-2:] != blocked.shape[-2:]:  # a decoding step: its query is in no group
            return mask
        mask = mask.masked_fill(blocked[:, None].to(mask.device), torch.finfo(mask.dtype).min)
        warn_if_queries_emptied(mask, real, "an attention mask")
        return mask

    delegated = delegated_attention_layers(vlm, layers)
    scored = [layer for layer in layers if layer not in delegated]
    with vlm.hooks(fwd_hooks=knockout_hooks(batch, edges, scored)), masks_edited(vlm, delegated, edit):
        yield vlm


def warn_if_queries_emptied(
    scores: Float[torch.Tensor, "batch head query key"], real: Bool[torch.Tensor, "batch pos"], where: str
) -> None:
    """Warn when the blocked edges leave a real query no key at all (every score at the dtype's
    minimum): the softmax then spreads it evenly over *every* position, padding and later tokens
    included, as HF's does given that mask, so what flows on from there depends on the batch. It
    happens where a layer lets a query read few keys: Llama 4's chunks, sliding windows (Gemma 3),
    an image at the very start (InstructBLIP), with ``("image", "image")`` blocked."""
    emptied = (scores < torch.finfo(scores.dtype).min / 2).all(-1) & real[:, None, :].to(scores.device)
    if emptied.any():
        rows = int(emptied.any(1).sum())
        warnings.warn(
            f"Knockout leaves {rows} real query position(s) with no key to read at {where}: their attention "
            "becomes an even average over every position (padding and later tokens included), which "
            "depends on the batch. Block fewer edges there, or leave those positions out of the reading.",
            RuntimeWarning,
            stacklevel=2,
        )


def delegated_attention_layers(vlm, layers: Iterable[int]) -> list[int]:
    """The ``layers`` whose attention transformer-lens delegates whole to the HF module (Gemma 4's):
    their ``hook_attn_scores`` fires after the fact, with HF's weights, and an edit there is discarded.
    Edges are removed from their attention mask instead (:func:`masks_edited`), the same numbers: the
    mask is added to the scores before the softmax."""
    # transformer-lens 4.3 marks such blocks (DelegatedAttentionBlockBridge) with this class attribute;
    # Gemma 3's attention keeps HF's module too but computes the scores itself, through its hooks
    return [layer for layer in layers if getattr(type(vlm.blocks[layer]), "maintain_native_attention", False)]


@contextmanager
def masks_edited(vlm, layers: Sequence[int], edit: Callable[[torch.Tensor], torch.Tensor]):
    """Context manager: the additive attention mask (``[batch, 1, query, key]``) HF's attention module
    of each of ``layers`` gets is replaced by ``edit(mask)`` for every forward inside."""

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise RuntimeError(
                f"{type(module).__name__} got no 4-D additive attention mask to remove edges from "
                f"(got {type(mask).__name__}); knockout and pruning need eager attention on this model."
            )
        return args, {**kwargs, "attention_mask": edit(mask)}

    handles = [
        vlm.blocks[layer].attn.original_component.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for layer in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def knockout_sweep(
    vlm,
    batch,
    edges: Sequence[tuple[Group, Group]],
    metric: Callable[[torch.Tensor], torch.Tensor],
    window: int = 3,
) -> torch.Tensor:
    """``metric`` of the output with ``edges`` blocked in ``[l, l + window)``, for every start ``l``.

    Returns ``[n_layers - window + 1]`` metric values (compare with the metric of the clean run).
    """
    if not 1 <= window <= vlm.cfg.n_layers:
        raise LayerError(
            f"knockout_sweep: window={window} does not fit this model's {vlm.cfg.n_layers} blocks; "
            f"give a window of 1 to {vlm.cfg.n_layers} layers."
        )
    batch = vlm.to_batch(batch)
    values = []
    for start in range(vlm.cfg.n_layers - window + 1):
        with knockout(vlm, batch, edges, range(start, start + window)):
            values.append(metric(vlm(batch)))
    return torch.stack(values)
