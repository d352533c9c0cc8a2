"""Run the language model's attention as HF's fused sdpa, and hand each layer's q, k, v to a callback.

transformer-lens' attention bridge recomputes attention step by step so that ``hook_pattern`` can
fire: a [batch, head, query, key] pattern in float32 for every layer, and an eager matmul-softmax-matmul
instead of one fused kernel. A caller that only needs reductions of the pattern (the collector's
norm-based attention) can skip all that: inside :func:`observed_sdpa_attention` each layer runs the
wrapped HF attention module itself (q/k/v/o projections still go through the bridge's hooked linears)
with an attention function registered in HF's ``AttentionInterface``. That function passes the
post-RoPE queries and keys and the values to the callback, then calls transformers' own
``sdpa_attention_forward``. Hooks on attention internals (``hook_pattern``, ``hook_attn_scores``,
``hook_rot_q``...) do not fire in this mode; block-level hooks (``hook_resid_post``) do.

Example:
    >>> seen = []
    >>> def observer(layer, q, k, v, scaling):
    ...     seen.append(layer)
    >>> with observed_sdpa_attention(vlm, observer):  # doctest: +SKIP
    ...     vlm(batch)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "hooked_vllm_observed_sdpa"
#: (layer, q [batch, head, query, d_head], k [batch, kv_head, key, d_head], v like k, scaling)
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def _observed_sdpa(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    observer, layer, causal_only = module._hooked_vllm_observer
    observer(layer, query, key, value, kwargs.get("scaling") or module.scaling)
    if causal_only:  # no padding: the fused causal kernel, exactly the same softmax
        attention_mask = None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _observed_sdpa)


def supported(vlm) -> bool:
    """Whether every layer's attention wraps an HF module that dispatches through ``AttentionInterface``
    (LLaMA-family backbones: LLaVA-1.5, InstructBLIP-Vicuna)."""
    for block in vlm.blocks:
        hf_attention = getattr(block.attn, "original_component", None)
        if hf_attention is None or not hasattr(getattr(hf_attention, "config", None), "_attn_implementation"):
            return False
        if not hasattr(hf_attention, "scaling"):
            return False
    return True


@contextmanager
def observed_sdpa_attention(vlm, observer: Observer, *, causal_only: bool = False) -> Iterator[None]:
    """Inside, every language-model layer's attention runs as HF sdpa and reports q, k, v to
    ``observer``. ``causal_only=True`` promises the batch has no padding (the mask is purely causal),
    which lets sdpa use its causal kernel. Everything is restored on exit, errors included; a layer
    that never reported raises (its architecture does not dispatch through ``AttentionInterface``)."""
    if not supported(vlm):
        raise NotImplementedError(
            "This model's attention does not dispatch through transformers' AttentionInterface; "
            "use the pattern-hook path (collect(..., attention='pattern'))."
        )
    reported: set[int] = set()

    def observe(layer, q, k, v, scaling):
        reported.add(layer)
        observer(layer, q, k, v, scaling)

    saved = []
    try:
        for layer, block in enumerate(vlm.blocks):
            bridge, hf_attention = block.attn, block.attn.original_component
            saved.append((bridge, hf_attention, hf_attention.config, bridge.__dict__.get("forward")))
            config = copy.copy(hf_attention.config)
            config._attn_implementation_internal = ATTENTION_NAME
            hf_attention.config = config
            hf_attention._hooked_vllm_observer = (observe, layer, causal_only)
            # object.__setattr__: the bridge forwards attribute writes to the module it wraps.
            object.__setattr__(bridge, "forward", hf_attention.__call__)
        yield
        missing = sorted(set(range(len(saved))) - reported)
        if missing:
            raise NotImplementedError(
                f"Layers {missing} ran no attention through {ATTENTION_NAME!r}; this architecture "
                "cannot be observed this way. Use collect(..., attention='pattern')."
            )
    finally:
        for bridge, hf_attention, config, forward in saved:
            hf_attention.config = config
            del hf_attention._hooked_vllm_observer
            if forward is None:
                bridge.__dict__.pop("forward", None)
            else:
                object.__setattr__(bridge, "forward", forward)
