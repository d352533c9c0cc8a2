"""Gemma 4: what only this family has (the shared bar, tests/test_families.py and
tests/test_family_lenses.py, runs on ``gemma4`` and ``gemma4_moe`` as on every family).

- image positions: the soft tokens of each image, as many as its aspect-ratio-preserving resize gives,
  row-major on its pooled grid; ``<|image>``/``<image|>`` special;
- bidirectional image blocks in the sliding-window layers only;
- per-layer embeddings: ``blocks.{l}.hook_per_layer_input`` is what HF's layer l gets, and an edit
  there is the same edit inside HF;
- KV sharing and normalised values: each layer's value hook, weighted by its pattern and projected by
  its W_O, is HF's attention output (the KV-shared layers' values are an earlier layer's);
- the MoE layout: per-expert hooks sum to the experts' output bit for bit, and an expert zeroed through
  its hook is the same edit inside HF (logits and greedy generation with every step's logits).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

from tests.conftest import FAMILY_IMAGE_SIZES, Family, family_images, hf_forward_inputs
from tests.moe_checks import (
    assert_generate_with_zeroed_hook_equals_hf_edit,
    assert_zeroed_hook_equals_hf_edit,
    summed_in_order,
    zeroed_in_hf,
)

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
TOL = 1e-5


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Family:
    return Family("gemma4", tmp_path_factory.mktemp("gemma4"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("gemma4_moe", tmp_path_factory.mktemp("gemma4-moe"))


def hf_layers(family):
    return family.reference.model.language_model.layers


def hf_logits(family, batch):
    return family.reference(**hf_forward_inputs(family, batch)).logits


def real_max(a, b, batch):
    return (a - b)[batch.attention_mask.bool()].abs().max().item()


# ---------------------------------------------------------------- image positions
@SIDES
def test_image_mask_is_the_soft_tokens_on_each_images_pooled_grid(dense, padding_side):
    vlm, config = dense.vlm, dense.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids = batch.input_ids
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    assert torch.equal(batch.image_mask, batch.inputs["mm_token_type_ids"] == 1)
    image = vlm.processor.image_processor
    pool, patch = image.pooling_kernel_size, image.patch_size
    expected = []
    for width, height in FAMILY_IMAGE_SIZES:  # HF's resize, written as the processor computes it
        h, w = get_aspect_ratio_preserving_size(height, width, patch, image.max_soft_tokens * pool**2, pool)
        expected.append((h // patch // pool, w // patch // pool))
    assert [rows * cols for rows, cols in expected] == [55, 55, 64]  # the counts differ per image
    assert batch.image_mask.sum(-1).tolist() == [rows * cols for rows, cols in expected]
    for item, (rows, cols) in enumerate(expected):
        (slots,) = batch.image_slots[item]
        assert tuple(slots.patch_index()[0].shape) == (rows, cols)
        assert torch.equal(slots.patch_index()[0].flatten(), torch.arange(rows * cols))
    for token in (config.boi_token_id, config.eoi_token_id):
        assert ((ids == token).sum(-1) == 1).all()
        assert batch.special_mask[ids == token].all()
    for i, ((start, end),) in enumerate(batch.ranges("image")):
        assert ids[i, start - 1] == config.boi_token_id and ids[i, end] == config.eoi_token_id


def test_image_blocks_are_bidirectional_in_sliding_layers_only(dense):
    vlm = dense.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    image = batch.image_mask
    n = image.shape[1]
    later = image[:, :, None] & image[:, None, :] & ~torch.ones(n, n, dtype=torch.bool).tril()
    window = vlm.adapter.text_config.sliding_window
    near = torch.ones(n, n, dtype=torch.bool).triu(1) & ~torch.ones(n, n, dtype=torch.bool).triu(window)
    kinds = vlm.adapter.text_config.layer_types
    assert set(kinds) == {"sliding_attention", "full_attention"}
    for layer, kind in enumerate(kinds):
        weight = cache["pattern", layer].sum(1)[later]
        if kind == "sliding_attention":  # later image tokens of the image within the window are read
            assert weight[near[None].expand_as(later)[later]].min() > 0
        else:
            assert weight.abs().max() == 0


# ---------------------------------------------------------------- per-layer embeddings
def hf_per_layer_inputs(family, batch, edit_layer=None, edit=None):
    """HF's logits and the ``per_layer_input`` each decoder layer got (optionally edited at one)."""
    got = {}

    def recorder(layer):
        def pre_hook(module, args, kwargs):
            value = args[1] if len(args) > 1 else kwargs["per_layer_input"]
            if layer == edit_layer:
                value = edit(value)
                args = (args[0], value, *args[2:]) if len(args) > 1 else args
                kwargs = kwargs if len(args) > 1 else {**kwargs, "per_layer_input": value}
            got[layer] = value
            return args, kwargs

        return pre_hook

    handles = [
        layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
        for i, layer in enumerate(hf_layers(family))
    ]
    try:
        logits = hf_logits(family, batch)
    finally:
        for handle in handles:
            handle.remove()
    return logits, got


@SIDES
def test_per_layer_input_hook_is_hfs_and_an_edit_there_is_hfs_edit(dense, padding_side):
    vlm = dense.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_per_layer_input"))
    _, theirs = hf_per_layer_inputs(dense, batch)
    assert len(theirs) == vlm.cfg.n_layers
    for layer, value in theirs.items():
        ours = cache[f"blocks.{layer}.hook_per_layer_input"]
        assert ours.shape == value.shape == (*batch.input_ids.shape, 8)
        assert (ours - value)[real].abs().max() <= TOL
    # the image enters every layer here too: the per-layer inputs differ at image positions between images
    other = vlm.prepare(family_images(seed=3), PROMPTS, padding_side=padding_side)
    _, other_cache = vlm.run_with_cache(other, names_filter="blocks.2.hook_per_layer_input")
    moved = (other_cache["blocks.2.hook_per_layer_input"] - cache["blocks.2.hook_per_layer_input"]).abs()
    assert moved[batch.image_mask].max() > 1e-3 and moved[batch.text_mask].max() == 0

    zero = [("blocks.2.hook_per_layer_input", lambda x, hook: torch.zeros_like(x))]
    ours = vlm.run_with_hooks(batch, fwd_hooks=zero)
    expected, _ = hf_per_layer_inputs(dense, batch, 2, torch.zeros_like)
    assert real_max(ours, expected, batch) <= TOL
    assert real_max(ours, vlm(batch), batch) > 1e-3, "the ablation must change something"


# ---------------------------------------------------------------- KV sharing, normalised values
@pytest.mark.parametrize("which", ["dense", "moe"])
def test_value_hooks_weighted_by_the_pattern_give_hfs_attention_output(which, request):
    family = request.getfixturevalue(which)
    vlm = family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    value_hooks = vlm.adapter.value_hooks()
    if which == "dense":  # layers 3 and 4 reuse the keys and values of layers 2 and 1
        assert value_hooks[3] == "blocks.2.attn.v_norm.hook_out"
        assert value_hooks[4] == "blocks.1.attn.v_norm.hook_out"
        assert "blocks.3.attn.hook_v" not in vlm.hook_dict
    _, cache = vlm.run_with_cache(batch)
    outputs = {}

    def record(layer):
        def hook(module, args, output):
            outputs[layer] = output[0]

        return hook

    handles = [block.self_attn.register_forward_hook(record(i)) for i, block in enumerate(hf_layers(family))]
    try:
        hf_logits(family, batch)
    finally:
        for handle in handles:
            handle.remove()
    from hooked_vllm.model.layers import attention_w_o

    for layer in vlm.adapter.attention_layers:
        pattern, values = cache["pattern", layer], cache[value_hooks[layer]]
        w_o = attention_w_o(vlm.blocks[layer].attn)
        values = values.repeat_interleave(pattern.shape[1] // values.shape[2], dim=2)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, values)
        ours = torch.einsum("bqhd,hdm->bqm", z, w_o)
        assert (ours - outputs[layer])[real].abs().max() <= TOL, layer


# ---------------------------------------------------------------- mixture of experts
def zero_expert_in_hf(family, layer, expert):
    """A context: HF's expert ``expert`` of ``layer`` outputs zeros (its down projection zeroed)."""
    return zeroed_in_hf(hf_layers(family)[layer].experts.down_proj, expert)


def test_expert_hooks_sum_to_the_experts_output_and_the_mlp_term_holds_both_branches(moe):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    assert tuple(vlm.adapter.routed_experts()) == tuple(range(vlm.cfg.n_layers))
    _, cache = vlm.run_with_cache(batch)
    n_experts = vlm.adapter.text_config.num_experts
    for layer in range(vlm.cfg.n_layers):
        parts = [cache[f"blocks.{layer}.mlp.experts.{e}.hook_out"] for e in range(n_experts)]
        assert torch.equal(summed_in_order(parts), cache[f"blocks.{layer}.experts.hook_out"])
        # each routed row gets exactly top_k experts' contributions
        routed = torch.stack([p.abs().amax(-1) > 0 for p in parts]).sum(0)
        assert (routed == vlm.adapter.text_config.top_k_experts).all()
        # hook_mlp_out is the whole feed-forward term: the residual after it is the stream before
        # the per-layer scale
        block = hf_layers(moe)[layer]
        mid, out = cache[f"blocks.{layer}.hook_resid_mid"], cache[f"blocks.{layer}.hook_mlp_out"]
        assert (
            cache[f"blocks.{layer}.hook_resid_post"] - (mid + out) * block.layer_scalar
        ).abs().max() <= TOL


@pytest.mark.parametrize("expert", [0, 3])
def test_an_expert_zeroed_through_its_hook_is_the_same_edit_inside_hf(moe, expert):
    batch = moe.vlm.prepare(family_images(), PROMPTS)
    layer = 1
    name = f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    edit = zero_expert_in_hf(moe, layer, expert)
    assert_zeroed_hook_equals_hf_edit(moe, batch, name, edit, hf_logits, min_change=1e-4)
    # greedy generation with the expert zeroed at every step, every step's logits
    edit = zero_expert_in_hf(moe, layer, expert)
    assert_generate_with_zeroed_hook_equals_hf_edit(moe, batch, name, edit, n=4, must_change=False)
