"""Qwen3.5-MoE: the hybrid Qwen3.5 text model with a sparse mixture-of-experts MLP (router, routed
experts in one looped HF module, a gated shared expert). The shared bar (tests/test_families.py) runs
on it as on every family; here, what only MoE has: the hook points on the router and on each routed
expert's output against HF's own modules, an expert zeroed through its hook against the same edit
inside HF, the MLP term of a decomposition, and the routing-by-modality analysis against a hand count."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.analysis.routing import ExpertRouting, count_routing, expert_routing
from hooked_vllm.errors import UnsupportedModelError
from hooked_vllm.model.experts import check_looped_experts
from hooked_vllm.tiny_models.qwen3_5_moe import QWEN3_5_MOE_EXPERTS, QWEN3_5_MOE_TOP_K
from tests.conftest import Family, family_images
from tests.moe_checks import (
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
E, K = QWEN3_5_MOE_EXPERTS, QWEN3_5_MOE_TOP_K


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("qwen3_5_moe", tmp_path_factory.mktemp("qwen3-5-moe"))


def hf_blocks(family):
    return family.reference.model.get_decoder().layers


def hf_logits(family, batch):
    return family.reference(**dict(batch.inputs)).logits


def test_every_layer_has_the_router_and_per_expert_hook_points(moe):
    vlm = moe.vlm
    names = vlm.hook_dict
    assert vlm.adapter.routed_experts().keys() == set(range(vlm.cfg.n_layers))
    for layer in range(vlm.cfg.n_layers):
        for suffix in (
            "mlp.gate.hook_out",  # router logits (transformer-lens's name)
            "mlp.hook_expert_weights",
            "mlp.hook_expert_indices",
            "mlp.experts.hook_out",
            "mlp.shared_expert.hook_out",
            "mlp.shared_expert_gate.hook_out",
            "hook_mlp_out",
        ):
            assert f"blocks.{layer}.{suffix}" in names, suffix
        assert_expert_hook_points(names, layer, E)
    # the experts run HF's eager loop, which the hooked loop reproduces
    assert moe.vlm.hf_model.config.get_text_config()._experts_implementation == "eager"


@SIDES
def test_router_hooks_equal_hfs_router(moe, padding_side):
    """Router logits and the chosen experts, against the outputs of HF's own router modules."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    gates = {layer: block.mlp.gate for layer, block in enumerate(hf_blocks(moe))}
    routers = hf_module_outputs(gates, lambda: hf_logits(moe, batch))
    assert tuple(routers) == tuple(range(vlm.cfg.n_layers))
    assert_router_hooks_equal_hf(vlm, batch, routers, E)


@SIDES
def test_expert_outputs_sum_to_the_routed_experts_and_the_mlp_term(moe, padding_side):
    """Each expert's hook holds its weighted output at the rows routed to it and zero elsewhere; in
    expert order they sum to the experts' output bit for bit; with the gated shared expert they are
    the MLP term (``hook_mlp_out``), the term ``decompose_resid`` counts."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    _, cache = vlm.run_with_cache(batch)
    shape = (*batch.input_ids.shape, vlm.cfg.d_model)
    for layer in range(vlm.cfg.n_layers):
        indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        total = summed_in_order(routed_expert_outputs(vlm, cache, batch, layer, E, indices))
        assert torch.equal(total, cache[f"blocks.{layer}.mlp.experts.hook_out"])
        gate = torch.sigmoid(cache[f"blocks.{layer}.mlp.shared_expert_gate.hook_out"])
        mlp_term = total + gate * cache[f"blocks.{layer}.mlp.shared_expert.hook_out"]
        assert torch.equal(mlp_term.reshape(shape), cache[f"blocks.{layer}.hook_mlp_out"])
    labels = assert_mlp_terms_sum_to_the_stream(vlm, cache, batch)
    # the Gated DeltaNet layers' mixer has no hook_attn_out: its output is their term
    assert labels[:4] == ["embed", "0_linear_attn_out", "0_mlp_out", "1_attn_out"]


def zero_expert_in_hf(family, layer, expert):
    """HF's own edit: expert ``expert``'s down projection at ``layer`` set to zero (its output is then
    zero at every token routed to it), undone on exit."""
    return zeroed_in_hf(hf_blocks(family)[layer].mlp.experts.down_proj, expert)


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(0, 1), (1, 0), (3, 3)])
def test_zeroing_an_expert_through_its_hook_equals_the_edit_inside_hf(moe, padding_side, layer, expert):
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    name = f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    assert_zeroed_hook_equals_hf_edit(moe, batch, name, zero_expert_in_hf(moe, layer, expert), hf_logits)


def test_generate_with_an_expert_zeroed_equals_hf_generate_with_the_edit(moe):
    """The hook fires at every decoding step too (HF's cache path): tokens and every step's logits."""
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side="left")
    assert_generate_with_zeroed_hook_equals_hf_edit(
        moe, batch, "blocks.1.mlp.experts.0.hook_out", zero_expert_in_hf(moe, 1, 0)
    )


def test_an_experts_module_of_another_layout_is_refused():
    class Transposed(torch.nn.Module):
        is_transposed = True
        num_experts = 2

        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.zeros(2, 4, 8))
            self.down_proj = torch.nn.Parameter(torch.zeros(2, 4, 2))
            self.act_fn = torch.nn.SiLU()

    with pytest.raises(UnsupportedModelError, match="failing: not is_transposed"):
        check_looped_experts(Transposed())


# ---------------------------------------------------------------- routing by modality
@SIDES
def test_routing_by_modality_equals_a_hand_count_from_the_router_logits(moe, padding_side):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    routing = expert_routing(vlm, batch)
    assert routing.layers == tuple(range(vlm.cfg.n_layers)) and routing.modalities == ("image", "text")
    assert routing.counts.shape == (vlm.cfg.n_layers, 2, E)
    assert routing.tokens.tolist() == [int(batch.image_mask.sum()), int(batch.text_mask.sum())]
    assert_routing_equals_a_hand_count(vlm, batch, routing, routing.layers, E, K)
    assert torch.allclose(routing.fractions.sum(-1), torch.ones(vlm.cfg.n_layers, 2, dtype=torch.float64))
    # the tiny model routes image and text tokens differently somewhere
    assert (routing.fractions[:, 0] - routing.fractions[:, 1]).abs().max() > 0.05


def test_count_routing_unit():
    indices = {2: torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])}
    masks = {
        "image": torch.tensor([[True, True], [False, False]]),
        "text": torch.tensor([[False, False], [True, False]]),
    }
    routing = count_routing(indices, masks, n_experts=3)
    assert routing.layers == (2,)
    assert routing.counts.tolist() == [[[1, 2, 1], [1, 0, 1]]]
    assert routing.tokens.tolist() == [2, 1]
    with pytest.raises(ValueError, match="Cannot add"):
        routing + ExpertRouting(routing.counts, routing.tokens, (3,))


def test_routing_figure(moe, tmp_path):
    from hooked_vllm.report.routing import show_expert_routing

    vlm = moe.vlm
    routing = expert_routing(vlm, vlm.prepare(family_images(), PROMPTS))
    fig = show_expert_routing(routing)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("image tokens") and titles[1].startswith("text tokens")
    assert titles[2] == "image - text"
    heat = fig.axes[0].images[0].get_array()
    assert heat.shape == (vlm.cfg.n_layers, E)
    assert torch.allclose(
        torch.as_tensor(heat.data, dtype=torch.float64), routing.fractions[:, 0].float().double()
    )
    fig.savefig(tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 0
