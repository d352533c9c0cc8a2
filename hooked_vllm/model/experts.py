"""A hook point on each routed expert's output, for HF's looped mixture-of-experts modules.

transformer-lens 4.3 wraps a sparse MoE block whole (``blocks.{l}.mlp``: its ``gate`` router with
``hook_out`` on the router logits, ``hook_expert_weights``/``hook_expert_indices`` on the routing,
and ``experts.hook_out`` on the experts' weighted sum); HF runs all routed experts inside one module
(``Qwen3_5MoeExperts``, and Qwen3-VL-MoE's ``Qwen3VLMoeTextExperts``, whose forward is the same
source: 3-D ``gate_up_proj``/``down_proj``, a loop over the experts chosen in the batch). Per expert
there is no module, so no hook point. :func:`install_expert_hooks` gives that module a forward that
is HF's eager loop, line for line, with each expert's contribution passed through a hook point
before it is added:

``blocks.{l}.mlp.experts.{e}.hook_out``: ``[batch * pos, d_model]`` (rows as the router's hooks and
``blocks.{l}.mlp.experts.hook_out`` flatten them, row ``b * pos + p``), expert e's output times its
routing weight at the rows routed to it, zero elsewhere. The sum over the experts (in expert order,
as HF adds them) is ``blocks.{l}.mlp.experts.hook_out``, bit for bit. An edit anywhere is added as
it is: zeroing removes the expert from the MLP term; a vector at a row not routed to e is added there.
The point fires for every expert on every forward (an expert no token chose gives zeros), only while
some hook sits on one of the layer's points; otherwise HF's own forward runs.

Llama 4's experts (``Llama4TextExperts``) take another layout (:func:`takes_prescaled_tokens`): every
token once per expert, already multiplied by its router score (a sigmoid of its top-k logit; zero for
an expert not chosen), all experts in one batched matmul. There the point is expert e's block of
HF's output, ``[batch * pos, d_model]``: expert e applied to the scaled token where it was chosen,
zero elsewhere (the expert maps 0 to 0); the block sums them as it sums HF's.

The MLP term of a decomposition (``blocks.{l}.hook_mlp_out``, ``cache.decompose_resid``) is the
whole block's output: the routed experts' sum plus, in Qwen3.5-MoE, the shared expert scaled by its
sigmoid gate (``blocks.{l}.mlp.shared_expert.hook_out``, ``blocks.{l}.mlp.shared_expert_gate.hook_out``);
Qwen3-VL-MoE has no shared expert, so there the experts' sum is the MLP term; in Llama 4 the
shared expert's output (``blocks.{l}.mlp.shared_expert.hook_out``, ungated) plus the experts' sum.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from hooked_vllm.errors import UnsupportedModelError
from hooked_vllm.model.tl import HookPoint


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The HF module under any transformer-lens bridge wrappers."""
    while isinstance(getattr(module, "original_component", None), torch.nn.Module):
        module = module.original_component
    return module


def check_looped_experts(experts: torch.nn.Module) -> None:
    """Refuse an experts module whose layout the hooked loop does not reproduce: it takes HF's
    concatenated, untransposed ``gate_up_proj [E, 2 * d_mlp, d_model]`` and ``down_proj
    [E, d_model, d_mlp]`` without biases, SwiGLU-style (``act(gate) * up``)."""
    layout = {
        "gate_up_proj": getattr(getattr(experts, "gate_up_proj", None), "ndim", None) == 3,
        "down_proj": getattr(getattr(experts, "down_proj", None), "ndim", None) == 3,
        "act_fn": hasattr(experts, "act_fn"),
        "has_gate": getattr(experts, "has_gate", True),
        "not has_bias": not getattr(experts, "has_bias", False),
        "not is_transposed": not getattr(experts, "is_transposed", False),
        "is_concatenated": getattr(experts, "is_concatenated", True),
        "not has_post_expert_norm": not getattr(experts, "has_post_expert_norm", False),
    }
    missing = [what for what, holds in layout.items() if not holds]
    if missing:
        raise UnsupportedModelError(
            f"{type(experts).__name__} has no per-expert hook points: its layout is not HF's looped "
            f"SwiGLU experts (failing: {', '.join(missing)})."
        )


def install_expert_hooks(experts: torch.nn.Module, points: Sequence[HookPoint]) -> None:
    """Give ``experts`` (an HF looped experts module, or a bridge around one) a forward that passes
    each expert's weighted output through ``points[e]`` (see the module docstring).

    Example:
        >>> points = [HookPoint() for _ in range(experts.num_experts)]  # doctest: +SKIP
        >>> install_expert_hooks(experts, points)  # doctest: +SKIP
    """
    experts = unwrap(experts)
    if len(points) != experts.num_experts:
        raise ValueError(f"{len(points)} hook points for {experts.num_experts} experts.")
    if takes_prescaled_tokens(experts):
        _install_prescaled_hooks(experts, tuple(points))
        return
    check_looped_experts(experts)
    unhooked = experts.forward
    points = tuple(points)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        if not any(_has_any_hook(point) for point in points):
            return unhooked(hidden_states, top_k_index, top_k_weights)
        return _hooked_loop(self, points, hidden_states, top_k_index, top_k_weights)

    experts.forward = types.MethodType(forward, experts)


def takes_prescaled_tokens(experts: torch.nn.Module) -> bool:
    """Whether ``experts`` has Llama 4's layout (``Llama4TextExperts``): a forward of the tokens alone,
    ``[n_experts * tokens, d_model]`` (every token once per expert, already multiplied by its router
    score: zero where the expert was not chosen), every expert run on its block by one batched matmul
    (``gate_up_proj [E, d_model, 2 * d_mlp]``, ``down_proj [E, d_mlp, d_model]``), the output in the
    same blocks."""
    gate_up = getattr(experts, "gate_up_proj", None)
    parameters = list(inspect.signature(experts.forward).parameters)
    return (
        parameters == ["hidden_states"]
        and getattr(gate_up, "ndim", None) == 3
        and gate_up.shape[1] == getattr(experts, "hidden_size", None)
    )


def _install_prescaled_hooks(experts: torch.nn.Module, points: Sequence[HookPoint]) -> None:
    """Llama 4: HF's forward, then each expert's block of the output (``[tokens, d_model]``: its
    output on the tokens scaled by their scores, zero at tokens not routed to it, since the expert
    maps 0 to 0) through its point. The MoE block sums the blocks as it sums HF's, same floats."""
    unhooked = experts.forward

    def forward(self, hidden_states):
        output = unhooked(hidden_states)
        if not any(_has_any_hook(point) for point in points):
            return output
        blocks = output.view(self.num_experts, -1, output.shape[-1])
        return torch.stack([point(blocks[e]) for e, point in enumerate(points)]).view(output.shape)

    experts.forward = types.MethodType(forward, experts)


def _hooked_loop(
    experts: torch.nn.Module,
    points: Sequence[HookPoint],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """HF's eager ``Qwen3_5MoeExperts.forward`` (transformers 5.23), each expert's contribution
    scattered into ``[tokens, d_model]`` and hooked before it is added. Adding a scattered row to
    the sum is the same float operation as HF's ``index_add_`` (``x + 0 == x``), so the result is HF's."""
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = F.one_hot(top_k_index, num_classes=experts.num_experts + 1).permute(2, 1, 0)
    for expert in range(experts.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        contribution = torch.zeros_like(final)
        if token_idx.numel():
            current = hidden_states[token_idx]
            gate, up = F.linear(current, experts.gate_up_proj[expert]).chunk(2, dim=-1)
            current = experts.act_fn(gate) * up
            current = F.linear(current, experts.down_proj[expert])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            contribution = contribution.index_add(0, token_idx, current.to(final.dtype))
        final = final + points[expert](contribution)
    return final


def _has_any_hook(point: HookPoint) -> bool:
    return bool(
        point.has_hooks() or point._forward_hooks or point._forward_pre_hooks or point._backward_hooks
    )
