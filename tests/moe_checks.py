"""Checks every mixture-of-experts family runs against HF (Qwen3.5-MoE, Qwen3-VL-MoE, GLM-4.5V, Llama 4,
Gemma 4's MoE): the router's hooks against the outputs of HF's router modules, each routed expert's
hook zero exactly off the rows routed to it, the MLP term in a decomposition, an expert zeroed through
its hook against the same edit inside HF (forward, and generate with every step's logits), and the
routing-by-modality counts against a hand count. Each family's test file passes what is its own: the
layers, the expert, the HF module to edit, how it calls HF."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch

from hooked_vllm.analysis.routing import expert_routing
from tests.test_families import generate_with_step_logits

NEVER = -1  # an eos token id no step produces
TOL = 1e-5
ZERO = lambda x, hook: torch.zeros_like(x)  # noqa: E731


@contextlib.contextmanager
def zeroed_in_hf(weight: torch.Tensor, index: int | None = None) -> Iterator[None]:
    """HF's own edit: ``weight`` (or its slice ``index``, e.g. one expert's down projection) set to
    zero, restored on exit."""
    saved = weight.detach().clone()
    with torch.no_grad():
        (weight if index is None else weight[index]).zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def hf_module_outputs(modules: Mapping, run: Callable[[], object]) -> dict:
    """``{key: output}`` of HF modules ``{key: module}`` during ``run()`` (forward hooks, removed after)."""
    outputs = {}
    handles = [
        module.register_forward_hook(lambda m, args, output, key=key: outputs.__setitem__(key, output))
        for key, module in modules.items()
    ]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def routed_rows(indices: torch.Tensor, expert: int) -> torch.Tensor:
    """``[tokens]``: the rows of ``[tokens, top_k]`` routing that chose ``expert``."""
    return (indices == expert).any(-1)


def assert_expert_hook_points(names, layer: int, n_experts: int, present: bool = True) -> None:
    """Layer ``layer`` has (or, ``present=False``, lacks) a hook per routed expert, and none past the last."""
    for expert in range(n_experts):
        assert (f"blocks.{layer}.mlp.experts.{expert}.hook_out" in names) == present, (layer, expert)
    assert f"blocks.{layer}.mlp.experts.{n_experts}.hook_out" not in names


def assert_router_hooks_equal_hf(vlm, batch, routers: Mapping, n_experts: int):
    """``routers``: ``{layer: (logits, top-k weights, top-k indices)}`` as HF's router modules returned
    them. ``mlp.gate.hook_out`` holds the logits, ``mlp.hook_expert_indices`` the chosen experts and
    ``mlp.hook_expert_weights`` their weights (scattered to ``[tokens, n_experts]`` by transformer-lens),
    at the real positions. Returns the cache of those hooks."""
    real = batch.attention_mask.bool().reshape(-1)
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: ".mlp.gate." in n or "hook_expert" in n)
    for layer, (logits, weights, indices) in routers.items():
        ours = cache[f"blocks.{layer}.mlp.gate.hook_out"]
        assert ours.shape == (real.numel(), n_experts)
        assert (ours - logits)[real].abs().max() <= TOL
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_expert_indices"][real], indices[real])
        scattered = cache[f"blocks.{layer}.mlp.hook_expert_weights"]
        assert (scattered.gather(-1, indices) - weights)[real].abs().max() <= TOL
    return cache


def routed_expert_outputs(vlm, cache, batch, layer: int, n_experts: int, chosen: torch.Tensor):
    """Each routed expert's hook ``[tokens, d_model]`` at ``layer``, in expert order, checked to hold
    nothing at the rows not routed to it and something at every row routed to it (``chosen``:
    ``[tokens, top_k]`` expert indices)."""
    outputs = []
    for expert in range(n_experts):
        out = cache[f"blocks.{layer}.mlp.experts.{expert}.hook_out"]
        assert out.shape == (batch.input_ids.numel(), vlm.cfg.d_model)
        routed = routed_rows(chosen, expert)
        assert not out[~routed].any() and (out[routed].abs().amax(-1) > 0).all(), (layer, expert)
        outputs.append(out)
    return outputs


def summed_in_order(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The experts' outputs added one by one in expert order (HF's eager loop's order)."""
    total = torch.zeros_like(outputs[0])
    for out in outputs:
        total = total + out
    return total


def assert_mlp_terms_sum_to_the_stream(vlm, cache, batch, tol: float = TOL) -> list[str]:
    """``decompose_resid``'s MLP term of every layer is ``hook_mlp_out`` bit for bit, and the terms sum
    to the last ``resid_post`` within ``tol`` at the real positions. Returns the labels."""
    components, labels = cache.decompose_resid(return_labels=True)
    for layer in range(vlm.cfg.n_layers):
        assert torch.equal(
            components[labels.index(f"{layer}_mlp_out")], cache[f"blocks.{layer}.hook_mlp_out"]
        )
    real = batch.attention_mask.bool()
    final = cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"]
    assert (components.sum(0) - final)[real].abs().max() <= tol
    return labels


def assert_zeroed_hook_equals_hf_edit(
    family, batch, hook_name: str, hf_edit, hf_logits: Callable, min_change: float = 1e-3
) -> None:
    """``hook_name`` zeroed through its hook gives the logits of HF under ``hf_edit`` (a context, e.g.
    :func:`zeroed_in_hf`) within 1e-5 at the real positions, and moves them by more than
    ``min_change``. ``hf_logits(family, batch)``: the family's own HF call."""
    vlm = family.vlm
    real = batch.attention_mask.bool()
    ours = vlm.run_with_hooks(batch, fwd_hooks=[(hook_name, ZERO)])
    with hf_edit:
        theirs = hf_logits(family, batch)
    assert (ours - theirs)[real].abs().max() <= TOL
    assert (ours - vlm(batch))[real].abs().max() > min_change, "the ablation must change something"


def assert_generate_with_zeroed_hook_equals_hf_edit(
    family, batch, hook_name: str, hf_edit, n: int = 5, must_change: bool = True
) -> None:
    """The hook fires at every decoding step too (HF's cache path): greedy tokens and every step's
    logits with ``hook_name`` zeroed equal HF's ``generate`` under ``hf_edit`` (1e-5); with
    ``must_change`` the logits also differ from a clean generation by more than 1e-3."""
    vlm = family.vlm
    with vlm.hooks(fwd_hooks=[(hook_name, ZERO)]):
        ours, our_logits = generate_with_step_logits(vlm, batch, n)
    with hf_edit:
        theirs = family.reference.generate(
            **batch.inputs,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=NEVER,
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert torch.equal(ours, theirs.sequences[:, batch.input_ids.shape[1] :])
    assert (our_logits - torch.stack(theirs.logits, dim=1)).abs().max() <= TOL
    if must_change:
        _, clean_logits = generate_with_step_logits(vlm, batch, n)
        assert (our_logits - clean_logits).abs().max() > 1e-3, "the ablation must change the logits"


def hand_count(cache, batch, layer: int, modality: str, n_experts: int, top_k: int) -> list[int]:
    """Per expert, how many of the modality's tokens chose it: top-k of the softmax of the router's
    logits (``mlp.gate.hook_out``), counted position by position."""
    logits = cache[f"blocks.{layer}.mlp.gate.hook_out"]
    mask = getattr(batch, f"{modality}_mask")
    width = mask.shape[1]
    counts = [0] * n_experts
    for item in range(mask.shape[0]):
        for pos in range(width):
            if mask[item, pos]:
                chosen = torch.softmax(logits[item * width + pos], -1).topk(top_k).indices
                for expert in chosen.tolist():
                    counts[expert] += 1
    return counts


def assert_routing_equals_a_hand_count(vlm, batch, routing, layers, n_experts: int, top_k: int) -> None:
    """``expert_routing``'s counts per MoE layer and modality are :func:`hand_count`'s, each token counted
    ``top_k`` times, and counted batch by batch (items 0 and 1-2) a dataset adds up."""
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("mlp.gate.hook_out"))
    for i, layer in enumerate(layers):
        for m, modality in enumerate(routing.modalities):
            counts = hand_count(cache, batch, layer, modality, n_experts, top_k)
            assert routing.counts[i, m].tolist() == counts, (layer, modality)
    assert torch.equal(routing.counts.sum(-1), top_k * routing.tokens.expand(len(layers), 2))
    halves = expert_routing(vlm, batch.select([0])) + expert_routing(vlm, batch.select([1, 2]))
    assert torch.equal(halves.counts, routing.counts) and torch.equal(halves.tokens, routing.tokens)
