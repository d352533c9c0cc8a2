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
from tests.test_families import generate_with_step_logits
from tests.test_family_qwen3_5_moe import routed_rows, zero_expert_in_hf

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
NEVER = -1
TOL = 1e-5
E, K = QWEN3_VL_MOE_EXPERTS, QWEN3_VL_MOE_TOP_K
MOE_LAYERS = (0, 2)


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("qwen3_vl_moe", tmp_path_factory.mktemp("qwen3-vl-moe"))


def hf_blocks(family):
    return family.reference.model.get_decoder().layers


def hf_logits(family, batch):
    return family.reference(**dict(batch.inputs)).logits


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
        for expert in range(E):
            assert (f"blocks.{layer}.mlp.experts.{expert}.hook_out" in names) == moe_layer
        assert f"blocks.{layer}.mlp.experts.{E}.hook_out" not in names
        assert not any(name.startswith(f"blocks.{layer}.mlp.shared_expert") for name in names)
    assert "blocks.1.mlp.dense_out.hook_out" in names  # the dense layer's down projection
    assert vlm.hf_model.config.get_text_config()._experts_implementation == "eager"


@SIDES
def test_router_hooks_equal_hfs_router(moe, padding_side):
    """Router logits and the chosen experts, against the outputs of HF's own router modules."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool().reshape(-1)
    routers = {}

    def record(layer):
        def hook(module, args, output):
            routers[layer] = output  # (logits, top-k weights, top-k indices)

        return hook

    handles = [hf_blocks(moe)[layer].mlp.gate.register_forward_hook(record(layer)) for layer in MOE_LAYERS]
    try:
        hf_logits(moe, batch)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: ".mlp.gate." in n or "hook_expert" in n)
    assert tuple(routers) == MOE_LAYERS
    for layer, (logits, weights, indices) in routers.items():
        ours = cache[f"blocks.{layer}.mlp.gate.hook_out"]
        assert ours.shape == (real.numel(), E)
        assert (ours - logits)[real].abs().max() <= TOL
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_expert_indices"][real], indices[real])
        scattered = cache[f"blocks.{layer}.mlp.hook_expert_weights"]  # [tokens, n_experts]
        assert (scattered.gather(-1, indices) - weights)[real].abs().max() <= TOL


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
        total = torch.zeros(shape[0] * shape[1], shape[2])
        for expert in range(E):
            out = cache[f"blocks.{layer}.mlp.experts.{expert}.hook_out"]
            assert out.shape == total.shape
            routed = routed_rows(indices, expert)
            assert not out[~routed].any() and (out[routed].abs().amax(-1) > 0).all()
            total = total + out
        assert torch.equal(total.reshape(shape), cache[f"blocks.{layer}.hook_mlp_out"])
    components, labels = cache.decompose_resid(return_labels=True)
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
    for layer in range(vlm.cfg.n_layers):
        assert torch.equal(
            components[labels.index(f"{layer}_mlp_out")], cache[f"blocks.{layer}.hook_mlp_out"]
        )
    real = batch.attention_mask.bool()
    final = cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"]
    assert (components.sum(0) - final)[real].abs().max() <= TOL


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(0, 1), (2, 0), (2, 3)])
def test_zeroing_an_expert_through_its_hook_equals_the_edit_inside_hf(moe, padding_side, layer, expert):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    zero = [(f"blocks.{layer}.mlp.experts.{expert}.hook_out", lambda x, hook: torch.zeros_like(x))]
    ours = vlm.run_with_hooks(batch, fwd_hooks=zero)
    with zero_expert_in_hf(moe, layer, expert):
        theirs = hf_logits(moe, batch)
    assert (ours - theirs)[real].abs().max() <= TOL
    assert (ours - vlm(batch))[real].abs().max() > 1e-3, "the ablation must change something"


def test_an_expert_and_a_deepstack_injection_zeroed_together_equal_hf(moe, monkeypatch):
    """The two mechanisms of this family compose: expert 2 of layer 2 and DeepStack's second
    injection zeroed through their hooks, against HF with that expert's down projection zeroed and
    ``get_image_features``' second DeepStack feature set zeroed."""
    vlm, reference = moe.vlm, moe.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    zero = [
        (name, lambda x, hook: torch.zeros_like(x))
        for name in ("blocks.2.mlp.experts.2.hook_out", "blocks.1.hook_deepstack")
    ]
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
    vlm, n = moe.vlm, 5
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    zero = [("blocks.2.mlp.experts.1.hook_out", lambda x, hook: torch.zeros_like(x))]
    with vlm.hooks(fwd_hooks=zero):
        ours, our_logits = generate_with_step_logits(vlm, batch, n)
    with zero_expert_in_hf(moe, 2, 1):
        theirs = moe.reference.generate(
            **batch.inputs,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=NEVER,
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert torch.equal(ours, theirs.sequences[:, batch.input_ids.shape[1] :])
    assert (our_logits - torch.stack(theirs.logits, dim=1)).abs().max() <= TOL
    _, clean_logits = generate_with_step_logits(vlm, batch, n)
    assert (our_logits - clean_logits).abs().max() > 1e-3, "the ablation must change the logits"


# ---------------------------------------------------------------- routing by modality
def hand_count(cache, batch, layer, modality):
    """Per expert, how many of the modality's tokens chose it: top-k of the softmax of the router's
    logits, counted position by position."""
    logits = cache[f"blocks.{layer}.mlp.gate.hook_out"]
    mask = getattr(batch, f"{modality}_mask")
    width = mask.shape[1]
    counts = [0] * E
    for item in range(mask.shape[0]):
        for pos in range(width):
            if mask[item, pos]:
                for expert in torch.softmax(logits[item * width + pos], -1).topk(K).indices.tolist():
                    counts[expert] += 1
    return counts


@SIDES
def test_routing_by_modality_equals_a_hand_count_from_the_router_logits(moe, padding_side):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    routing = expert_routing(vlm, batch)
    assert routing.layers == MOE_LAYERS and routing.modalities == ("image", "text")
    assert routing.counts.shape == (len(MOE_LAYERS), 2, E)
    assert routing.tokens.tolist() == [int(batch.image_mask.sum()), int(batch.text_mask.sum())]
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("mlp.gate.hook_out"))
    for i, layer in enumerate(MOE_LAYERS):
        for m, modality in enumerate(routing.modalities):
            assert routing.counts[i, m].tolist() == hand_count(cache, batch, layer, modality)
    assert torch.equal(routing.counts.sum(-1), K * routing.tokens.expand(len(MOE_LAYERS), 2))
    halves = expert_routing(vlm, batch.select([0])) + expert_routing(vlm, batch.select([1, 2]))
    assert torch.equal(halves.counts, routing.counts) and torch.equal(halves.tokens, routing.tokens)
