"""Qwen3-VL-MoE: Qwen3-VL's DeepStack with sparse mixture-of-experts MLPs (a router and routed experts
in one looped HF module, no shared expert; the tiny model keeps layer 1 dense, as ``mlp_only_layers``
allows). The shared bar (tests/test_families.py) runs on it as on every family; here, what only this
family has: the hook points on the router and on each routed expert's output against HF's own
modules on the MoE layers only, an expert zeroed through its hook against the same edit inside HF
(with and without DeepStack ablated), the MLP term of a decomposition beside the DeepStack terms, and
the routing-by-modality analysis against a hand count."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.analysis.routing import expert_routing
from hooked_vllm.tiny_models.qwen3_vl_moe import (
    QWEN3_VL_MOE_DENSE_LAYERS,
    QWEN3_VL_MOE_EXPERTS,
    QWEN3_VL_MOE_TOP_K,
)
from tests.conftest import Family, family_images
from tests.moe_checks import (
    TOL,
    ZERO,
    assert_expert_hook_points,
    assert_generate_with_zeroed_hook_equals_hf_edit,
    assert_mlp_terms_sum_to_the_stream,
    assert_router_hooks_equal_hf,
    assert_routing_equals_a_hand_count,
    assert_zeroed_hook_equals_hf_edit,
    hf_module_outputs,
    routed_expert_outputs,
    summed_in_order,
    zeroed_in_hf,
)

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
E, K = QWEN3_VL_MOE_EXPERTS, QWEN3_VL_MOE_TOP_K
MOE_LAYERS = (0, 2)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("qwen3_vl_moe", tmp_path_factory.mktemp("qwen3-vl-moe"))


def hf_blocks(family):
    return family.reference.model.get_decoder().layers


def hf_logits(family, batch):
    return family.reference(**dict(batch.inputs)).logits


def zero_expert_in_hf(family, layer, expert):
    """HF's own edit: expert ``expert``'s down projection at ``layer`` set to zero, undone on exit."""
    return zeroed_in_hf(hf_blocks(family)[layer].mlp.experts.down_proj, expert)


def test_the_moe_layers_have_the_router_and_per_expert_hook_points(moe):
    vlm = moe.vlm
    names = vlm.hook_dict
    assert QWEN3_VL_MOE_DENSE_LAYERS == (1,)
    assert tuple(vlm.adapter.routed_experts()) == MOE_LAYERS
    assert vlm.adapter.injection_layers == (0, 1)  # DeepStack after layers 0 and 1
    for layer in range(vlm.cfg.n_layers):
        moe_layer = layer in MOE_LAYERS
        assert f"blocks.{layer}.hook_mlp_out" in names
        for suffix in ("mlp.gate.hook_out", "mlp.hook_expert_weights", "mlp.hook_expert_indices"):
            assert (f"blocks.{layer}.{suffix}" in names) == moe_layer, (layer, suffix)
        assert_expert_hook_points(names, layer, E, present=moe_layer)
        assert not any(name.startswith(f"blocks.{layer}.mlp.shared_expert") for name in names)
    assert "blocks.1.mlp.dense_out.hook_out" in names  # the dense layer's down projection
    assert vlm.hf_model.config.get_text_config()._experts_implementation == "eager"


@SIDES
def test_router_hooks_equal_hfs_router(moe, padding_side):
    """Router logits and the chosen experts, against the outputs of HF's own router modules."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    gates = {layer: hf_blocks(moe)[layer].mlp.gate for layer in MOE_LAYERS}
    routers = hf_module_outputs(gates, lambda: hf_logits(moe, batch))
    assert tuple(routers) == MOE_LAYERS
    assert_router_hooks_equal_hf(vlm, batch, routers, E)


@SIDES
def test_expert_outputs_sum_to_the_mlp_term(moe, padding_side):
    """Each expert's hook holds its weighted output at the rows routed to it and zero elsewhere; in
    expert order they sum, bit for bit, to the whole MLP term (no shared expert): ``hook_mlp_out``,
    the term ``decompose_resid`` counts beside the DeepStack terms."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    _, cache = vlm.run_with_cache(batch)
    shape = (*batch.input_ids.shape, vlm.cfg.d_model)
    for layer in MOE_LAYERS:
        indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        total = summed_in_order(routed_expert_outputs(vlm, cache, batch, layer, E, indices))
        assert torch.equal(total.reshape(shape), cache[f"blocks.{layer}.hook_mlp_out"])
    labels = assert_mlp_terms_sum_to_the_stream(vlm, cache, batch)
    assert labels == [
        "embed",
        "0_attn_out",
        "0_mlp_out",
        "0_deepstack",
        "1_attn_out",
        "1_mlp_out",
        "1_deepstack",
        "2_attn_out",
        "2_mlp_out",
    ]


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(0, 1), (2, 0), (2, 3)])
def test_zeroing_an_expert_through_its_hook_equals_the_edit_inside_hf(moe, padding_side, layer, expert):
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    name = f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    assert_zeroed_hook_equals_hf_edit(moe, batch, name, zero_expert_in_hf(moe, layer, expert), hf_logits)


def test_an_expert_and_a_deepstack_injection_zeroed_together_equal_hf(moe, monkeypatch):
    """The two mechanisms of this family compose: expert 2 of layer 2 and DeepStack's second
    injection zeroed through their hooks, against HF with that expert's down projection zeroed and
    ``get_image_features``' second DeepStack feature set zeroed."""
    vlm, reference = moe.vlm, moe.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    zero = [(name, ZERO) for name in ("blocks.2.mlp.experts.2.hook_out", "blocks.1.hook_deepstack")]
    ours = vlm.run_with_hooks(batch, fwd_hooks=zero)
    original = reference.model.get_image_features

    def without_second_injection(*args, **kwargs):
        out = original(*args, **kwargs)
        out.deepstack_features[1] = tuple(torch.zeros_like(f) for f in out.deepstack_features[1])
        return out

    monkeypatch.setattr(reference.model, "get_image_features", without_second_injection)
    with zero_expert_in_hf(moe, 2, 2):
        theirs = hf_logits(moe, batch)
    assert (ours - theirs)[real].abs().max() <= TOL
    expert_only = vlm.run_with_hooks(batch, fwd_hooks=zero[:1])
    assert (ours - expert_only)[real].abs().max() > 1e-3, "the injection must matter"


def test_generate_with_an_expert_zeroed_equals_hf_generate_with_the_edit(moe):
    """The hook fires at every decoding step too (HF's cache path): tokens and every step's logits."""
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side="left")
    assert_generate_with_zeroed_hook_equals_hf_edit(
        moe, batch, "blocks.2.mlp.experts.1.hook_out", zero_expert_in_hf(moe, 2, 1)
    )


# ---------------------------------------------------------------- routing by modality
@SIDES
def test_routing_by_modality_equals_a_hand_count_from_the_router_logits(moe, padding_side):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    routing = expert_routing(vlm, batch)
    assert routing.layers == MOE_LAYERS and routing.modalities == ("image", "text")
    assert routing.counts.shape == (len(MOE_LAYERS), 2, E)
    assert routing.tokens.tolist() == [int(batch.image_mask.sum()), int(batch.text_mask.sum())]
    assert_routing_equals_a_hand_count(vlm, batch, routing, MOE_LAYERS, E, K)
