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
from tests.test_families import generate_with_step_logits

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
NEVER = -1
TOL = 1e-5
E, K = QWEN3_5_MOE_EXPERTS, QWEN3_5_MOE_TOP_K


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("qwen3_5_moe", tmp_path_factory.mktemp("qwen3-5-moe"))


def hf_blocks(family):
    return family.reference.model.get_decoder().layers


def hf_logits(family, batch):
    return family.reference(**dict(batch.inputs)).logits


def routed_rows(indices, expert):
    """``[tokens]``: the rows of ``[tokens, top_k]`` routing that chose ``expert``."""
    return (indices == expert).any(-1)


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
        for expert in range(E):
            assert f"blocks.{layer}.mlp.experts.{expert}.hook_out" in names
        assert f"blocks.{layer}.mlp.experts.{E}.hook_out" not in names
    # the experts run HF's eager loop, which the hooked loop reproduces
    assert moe.vlm.hf_model.config.get_text_config()._experts_implementation == "eager"


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

    handles = [
        block.mlp.gate.register_forward_hook(record(layer)) for layer, block in enumerate(hf_blocks(moe))
    ]
    try:
        hf_logits(moe, batch)
    finally:
        for handle in handles:
            handle.remove()
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: ".mlp.gate." in n or "hook_expert" in n)
    for layer, (logits, weights, indices) in routers.items():
        ours = cache[f"blocks.{layer}.mlp.gate.hook_out"]
        assert ours.shape == (real.numel(), E)
        assert (ours - logits)[real].abs().max() <= TOL
        assert torch.equal(cache[f"blocks.{layer}.mlp.hook_expert_indices"][real], indices[real])
        # transformer-lens scatters the top-k weights to [tokens, n_experts]
        scattered = cache[f"blocks.{layer}.mlp.hook_expert_weights"]
        assert (scattered.gather(-1, indices) - weights)[real].abs().max() <= TOL


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
        total = torch.zeros_like(cache[f"blocks.{layer}.mlp.experts.hook_out"])
        for expert in range(E):
            out = cache[f"blocks.{layer}.mlp.experts.{expert}.hook_out"]
            routed = routed_rows(indices, expert)
            assert not out[~routed].any() and (out[routed].abs().amax(-1) > 0).all()
            total = total + out
        assert torch.equal(total, cache[f"blocks.{layer}.mlp.experts.hook_out"])
        gate = torch.sigmoid(cache[f"blocks.{layer}.mlp.shared_expert_gate.hook_out"])
        mlp_term = total + gate * cache[f"blocks.{layer}.mlp.shared_expert.hook_out"]
        assert torch.equal(mlp_term.reshape(shape), cache[f"blocks.{layer}.hook_mlp_out"])
    components, labels = cache.decompose_resid(return_labels=True)
    # the Gated DeltaNet layers' mixer has no hook_attn_out: its output is their term
    assert labels[:4] == ["embed", "0_linear_attn_out", "0_mlp_out", "1_attn_out"]
    for layer in range(vlm.cfg.n_layers):
        assert torch.equal(
            components[labels.index(f"{layer}_mlp_out")], cache[f"blocks.{layer}.hook_mlp_out"]
        )
    real = batch.attention_mask.bool()
    assert (components.sum(0) - cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"])[
        real
    ].abs().max() <= TOL


def zero_expert_in_hf(family, layer, expert):
    """HF's own edit: expert ``expert``'s down projection at ``layer`` set to zero (its output is then
    zero at every token routed to it), undone on exit."""
    weight = hf_blocks(family)[layer].mlp.experts.down_proj
    saved = weight.detach().clone()

    class Zeroed:
        def __enter__(self):
            with torch.no_grad():
                weight[expert].zero_()

        def __exit__(self, *exc):
            with torch.no_grad():
                weight.copy_(saved)

    return Zeroed()


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(0, 1), (1, 0), (3, 3)])
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


def test_generate_with_an_expert_zeroed_equals_hf_generate_with_the_edit(moe):
    """The hook fires at every decoding step too (HF's cache path): tokens and every step's logits."""
    vlm, n = moe.vlm, 5
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    zero = [("blocks.1.mlp.experts.0.hook_out", lambda x, hook: torch.zeros_like(x))]
    with vlm.hooks(fwd_hooks=zero):
        ours, our_logits = generate_with_step_logits(vlm, batch, n)
    with zero_expert_in_hf(moe, 1, 0):
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
                chosen = torch.softmax(logits[item * width + pos], -1).topk(K).indices
                for expert in chosen.tolist():
                    counts[expert] += 1
    return counts


@SIDES
def test_routing_by_modality_equals_a_hand_count_from_the_router_logits(moe, padding_side):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    routing = expert_routing(vlm, batch)
    assert routing.layers == tuple(range(vlm.cfg.n_layers)) and routing.modalities == ("image", "text")
    assert routing.counts.shape == (vlm.cfg.n_layers, 2, E)
    assert routing.tokens.tolist() == [int(batch.image_mask.sum()), int(batch.text_mask.sum())]
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("mlp.gate.hook_out"))
    for layer in range(vlm.cfg.n_layers):
        for m, modality in enumerate(routing.modalities):
            assert routing.counts[layer, m].tolist() == hand_count(cache, batch, layer, modality)
    assert torch.equal(routing.counts.sum(-1), K * routing.tokens.expand(vlm.cfg.n_layers, 2))
    assert torch.allclose(routing.fractions.sum(-1), torch.ones(vlm.cfg.n_layers, 2, dtype=torch.float64))
    # the tiny model routes image and text tokens differently somewhere
    assert (routing.fractions[:, 0] - routing.fractions[:, 1]).abs().max() > 0.05
    # counted batch by batch, a dataset adds up
    halves = expert_routing(vlm, batch.select([0])) + expert_routing(vlm, batch.select([1, 2]))
    assert torch.equal(halves.counts, routing.counts) and torch.equal(halves.tokens, routing.tokens)


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
