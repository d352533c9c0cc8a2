"""Run the language model's attention as HF's fused sdpa, optionally handing q, k, v to a callback
(which may compute the attention output itself instead).

transformer-lens' attention bridge recomputes attention step by step so that ``hook_pattern`` can
fire: a [batch, head, query, key] pattern in float32 for every layer, and an eager matmul-softmax-matmul
instead of one fused kernel, even when nothing is hooked. Inside :func:`observed_sdpa_attention` a
layer runs the wrapped HF attention module itself (the q/k/v/o projections still go through the
bridge's hooked linears, so ``hook_q``, ``hook_k``, ``hook_v`` and ``hook_z`` fire as before) with an
attention function registered in HF's ``AttentionInterface``: it passes the post-RoPE queries and
keys and the values to the observer, then calls transformers' own ``sdpa_attention_forward``.
Hook points that only the step-by-step path has (``hook_pattern``, ``hook_attn_scores``,
``hook_rot_q``, ``hook_attn_out``...) do not fire on such a layer: :func:`needs_step_by_step`
tells which layers must keep it, and :meth:`HookedVLM.forward` switches only the others.

Example:
    >>> seen = []
    >>> def observer(layer, q, k, v, scaling):
    ...     seen.append(layer)
    >>> with observed_sdpa_attention(vlm, observer):  # doctest: +SKIP
    ...     vlm(batch)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hooked_vllm.model.tl import HookPoint

ATTENTION_NAME = "hooked_vllm_observed_sdpa"
#: (layer, q [batch, head, query, d_head], k [batch, kv_head, key, d_head], v like k, scaling) ->
#: None (the layer then runs HF sdpa) or the layer's attention output [batch, query, head, d_head],
#: computed by the observer itself (the collector's CPU path, which needs alpha anyway)
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor | None]
#: Bridge settings that change what the step-by-step attention computes.
_STEP_BY_STEP_SETTINGS = ("use_split_qkv_input", "use_attn_in", "use_attn_result")


def _observed_sdpa(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    observer, layer, causal_only = module._hooked_vllm_observer
    output = observer(layer, query, key, value, kwargs.get("scaling") or module.scaling)
    if output is not None:  # the observer computed the attention itself
        return output, None
    if causal_only:  # no padding: the fused causal kernel, exactly the same softmax
        attention_mask = None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _observed_sdpa)


def supported(vlm) -> bool:
    """Whether every layer's attention wraps an HF module that dispatches through ``AttentionInterface``
    (LLaMA-family backbones: LLaVA-1.5, InstructBLIP-Vicuna) and no bridge setting needs the
    step-by-step path."""
    if any(getattr(vlm.cfg, setting, False) for setting in _STEP_BY_STEP_SETTINGS):
        return False
    for layer in vlm.adapter.attention_layers:  # layers with no attention (linear attention) run as they are
        hf_attention = getattr(vlm.blocks[layer].attn, "original_component", None)
        if hf_attention is None or not hasattr(getattr(hf_attention, "config", None), "_attn_implementation"):
            return False
        if not hasattr(hf_attention, "scaling"):
            return False
        if getattr(hf_attention, "attn_logit_softcapping", None) is not None:
            return False  # Gemma 2: sdpa cannot soft-cap attention logits; the step-by-step path does
    return True


def needs_step_by_step(attention_bridge: torch.nn.Module) -> bool:
    """Whether a hook sits on a point of this attention bridge that only its step-by-step forward
    fires (every hook point of the bridge except those of its q/k/v/o linears)."""
    in_linears = {
        id(module)
        for name in ("q", "k", "v", "o")
        if name in attention_bridge._modules
        for module in attention_bridge._modules[name].modules()
    }
    for module in attention_bridge.modules():
        if isinstance(module, HookPoint) and id(module) not in in_linears and _has_any_hook(module):
            return True
    return False


def _has_any_hook(point: HookPoint) -> bool:
    return bool(
        point.has_hooks() or point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
    )


def _ignore(layer, q, k, v, scaling) -> None:
    return None


@contextmanager
def observed_sdpa_attention(
    vlm,
    observer: Observer | None = None,
    *,
    causal_only: bool = False,
    layers: Iterable[int] | None = None,
) -> Iterator[None]:
    """Inside, the language model's attention in ``layers`` (default: every layer that has
    attention) runs as HF sdpa and reports q, k, v to ``observer``. ``causal_only=True`` promises
    the batch has no padding (the mask is purely causal), which lets sdpa use its causal kernel.
    A layer already switched by an enclosing block keeps that block's observer. Everything is
    restored on exit, errors included; a switched layer that never reported raises (its
    architecture does not dispatch through ``AttentionInterface``)."""
    if not supported(vlm):
        raise NotImplementedError(
            "This model's attention does not dispatch through transformers' AttentionInterface; "
            "use the pattern-hook path (collect(..., attention='pattern'))."
        )
    observer = observer or _ignore
    reported: set[int] = set()

    def observe(layer, q, k, v, scaling):
        reported.add(layer)
        return observer(layer, q, k, v, scaling)

    saved = []
    try:
        for layer in vlm.adapter.attention_layers if layers is None else layers:
            bridge = vlm.blocks[layer].attn
            hf_attention = bridge.original_component
            if hasattr(hf_attention, "_hooked_vllm_observer"):
                continue  # an enclosing block already switched it
            saved.append((layer, bridge, hf_attention, hf_attention.config, bridge.__dict__.get("forward")))
            config = copy.copy(hf_attention.config)
            config._attn_implementation_internal = ATTENTION_NAME
            hf_attention.config = config
            hf_attention._hooked_vllm_observer = (observe, layer, causal_only)
            # object.__setattr__: the bridge forwards attribute writes to the module it wraps.
            object.__setattr__(bridge, "forward", hf_attention.__call__)
        yield
        missing = sorted({layer for layer, *_ in saved} - reported)
        if missing:
            raise NotImplementedError(
                f"Layers {missing} ran no attention through {ATTENTION_NAME!r}; this architecture "
                "cannot be observed this way. Use collect(..., attention='pattern')."
            )
    finally:
        for _, bridge, hf_attention, config, forward in saved:
            hf_attention.config = config
            del hf_attention._hooked_vllm_observer
            if forward is None:
                bridge.__dict__.pop("forward", None)
            else:
                object.__setattr__(bridge, "forward", forward)
