"""GLM-4.1V, GLM-4.5V and GLM-4.6V: what only these families have. The shared bar
(tests/test_families.py, tests/test_family_lenses.py) runs on all three; here:

- the image block between ``<|begin_of_image|>`` and ``<|end_of_image|>`` (structure tokens, no
  image mask) and the 3-D positions against a hand computation of GLM's rule;
- RoPE on the first half of each head only, the rotated queries against HF's own;
- GLM-4.1V's sandwich norms: ``hook_attn_out``/``hook_mlp_out`` are the normed sublayer outputs (what
  the stream gets), ``attn.hook_out``/``mlp.hook_out`` the raw ones, each against HF's module and an
  edit at each against the same edit inside HF;
- GLM-4.5V's MoE: the grouped sigmoid router against HF's router and a hand reference, each routed
  expert's hook and the shared expert's against HF, the MLP term, zeroing an expert or the shared
  expert through its hook against the same edit inside HF (forward and generate);
- GLM-4.6V with either text model.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from transformers import Glm46VConfig
from transformers.models.glm4v import modeling_glm4v
from transformers.models.glm4v_moe import modeling_glm4v_moe

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.adapters import adapter_class_for
from hooked_vllm.analysis.routing import expert_routing
from hooked_vllm.tiny_models.glm4v import (
    GLM_MOE_DENSE,
    GLM_MOE_EXPERTS,
    GLM_MOE_GROUPS,
    GLM_MOE_TOP_GROUPS,
    GLM_MOE_TOP_K,
    tiny_glm46v,
)
from tests.conftest import Family, family_images
from tests.moe_checks import (
    TOL,
    ZERO,
    assert_generate_with_zeroed_hook_equals_hf_edit,
    assert_mlp_terms_sum_to_the_stream,
    assert_router_hooks_equal_hf,
    assert_zeroed_hook_equals_hf_edit,
    hf_module_outputs,
    routed_expert_outputs,
    summed_in_order,
    zeroed_in_hf,
)

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
E, K = GLM_MOE_EXPERTS, GLM_MOE_TOP_K
MOE_LAYERS = (1, 2)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Family:
    return Family("glm4v", tmp_path_factory.mktemp("glm4v"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Family:
    return Family("glm4v_moe", tmp_path_factory.mktemp("glm4v-moe"))


@pytest.fixture(scope="module", params=["glm4v", "glm4v_moe", "glm46v"])
def glm(request, tmp_path_factory) -> Family:
    if request.param in ("glm4v", "glm4v_moe"):
        return request.getfixturevalue({"glm4v": "dense", "glm4v_moe": "moe"}[request.param])
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def hf_blocks(family):
    return family.reference.model.get_decoder().layers


def hf_logits(family, batch):
    return family.reference(**dict(batch.inputs)).logits


@contextlib.contextmanager
def hf_hooks(hooks):
    """Forward hooks ``[(module, hook)]`` on HF modules, removed on exit."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def recorder(store, key):
    def hook(module, args, output):
        store[key] = output[0] if isinstance(output, tuple) else output

    return hook


# ---------------------------------------------------------------- image block and positions
@SIDES
def test_image_mask_is_the_image_tokens_between_begin_and_end_of_image(glm, padding_side):
    vlm, config = glm.vlm, glm.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids = batch.input_ids
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    assert torch.equal(batch.image_mask, batch.inputs["mm_token_type_ids"] == 1)
    merge = config.vision_config.spatial_merge_size
    per_item = batch.image_mask.sum(-1).tolist()
    assert per_item == (batch.inputs["image_grid_thw"].prod(-1) // merge**2).tolist() == [18, 18, 25]
    for token in (config.image_start_token_id, config.image_end_token_id):
        assert ((ids == token).sum(-1) == 1).all()
        assert batch.special_mask[ids == token].all()
    for item, ((start, end),) in enumerate(batch.ranges("image")):
        assert ids[item, start - 1] == config.image_start_token_id
        assert ids[item, end] == config.image_end_token_id


def glm_positions(ids, image_token, grids, merge):
    """GLM's 3-D positions of one item's real tokens, by hand: a text token at p gets (p, p, p); an
    image of h x w merged patches starting at p gets (p, p + row, p + col), and the text after it
    continues at p + max(h, w)."""
    positions, p, k, grids = [], 0, 0, iter(grids)
    while k < len(ids):
        if ids[k] != image_token:
            positions.append((p, p, p))
            p, k = p + 1, k + 1
            continue
        _, h, w = (n // m for n, m in zip(next(grids), (1, merge, merge), strict=True))
        positions += [(p, p + row, p + col) for row in range(h) for col in range(w)]
        p, k = p + max(h, w), k + h * w
    return torch.tensor(positions).T


@SIDES
def test_positions_follow_glms_3d_rule(glm, padding_side):
    vlm, config = glm.vlm, glm.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    positions = batch.position_ids
    assert positions.shape == (3, *batch.input_ids.shape)
    grids = batch.inputs["image_grid_thw"].tolist()
    merge = config.vision_config.spatial_merge_size
    for item in range(len(batch)):
        real = batch.attention_mask[item].bool()
        expected = glm_positions(
            batch.input_ids[item][real].tolist(), config.image_token_id, grids[item : item + 1], merge
        )
        assert torch.equal(positions[:, item, real], expected)
        assert not torch.equal(expected[1], expected[2]), "height and width positions must differ"


# ---------------------------------------------------------------- RoPE on half of each head
@pytest.mark.parametrize("name", ["glm4v", "glm4v_moe"])
def test_rope_rotates_the_first_half_of_each_head_as_hf_does(name, dense, moe, monkeypatch):
    family = {"glm4v": dense, "glm4v_moe": moe}[name]
    module = {"glm4v": modeling_glm4v, "glm4v_moe": modeling_glm4v_moe}[name]
    vlm = family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    rotated = []
    original = module.apply_rotary_pos_emb

    def record(q, k, *args, **kwargs):
        out = original(q, k, *args, **kwargs)
        rotated.append(out[0])  # [batch, head, pos, d_head]
        return out

    monkeypatch.setattr(module, "apply_rotary_pos_emb", record)
    hf_logits(family, batch)
    _, cache = vlm.run_with_cache(
        batch, names_filter=lambda n: n.endswith(("attn.hook_q", "attn.hook_rot_q"))
    )
    real = batch.attention_mask.bool()
    half = vlm.cfg.d_head // 2
    assert len(rotated) == vlm.cfg.n_layers
    for layer, theirs in enumerate(rotated):
        q, rot_q = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_rot_q"]
        assert rot_q.shape == q.shape == (*real.shape, vlm.cfg.n_heads, vlm.cfg.d_head)
        assert torch.equal(rot_q[..., half:], q[..., half:]), "the second half is not rotated"
        assert (rot_q[..., :half] - q[..., :half])[real].abs().max() > 1e-2
        assert (rot_q - theirs.transpose(1, 2))[real].abs().max() <= TOL


# ---------------------------------------------------------------- GLM-4.1V's sandwich norms
@SIDES
def test_sandwich_norms_hook_points_equal_hfs_modules(dense, padding_side):
    vlm = dense.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    seen = {}
    hooks = []
    for layer, block in enumerate(hf_blocks(dense)):
        for key, module in (
            ("attn", block.self_attn),
            ("attn_normed", block.post_self_attn_layernorm),
            ("mlp", block.mlp),
            ("mlp_normed", block.post_mlp_layernorm),
        ):
            hooks.append((module, recorder(seen, f"{key}{layer}")))
    with hf_hooks(hooks):
        hf_logits(dense, batch)
    _, cache = vlm.run_with_cache(batch)
    for layer in range(vlm.cfg.n_layers):
        pre, mid = cache[f"blocks.{layer}.hook_resid_pre"], cache[f"blocks.{layer}.hook_resid_mid"]
        attn_out, mlp_out = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        for ours, key in (
            (cache[f"blocks.{layer}.attn.hook_out"], "attn"),
            (attn_out, "attn_normed"),
            (cache[f"blocks.{layer}.mlp.hook_out"], "mlp"),
            (mlp_out, "mlp_normed"),
        ):
            assert (ours - seen[f"{key}{layer}"])[real].abs().max() <= TOL, (layer, key)
        assert torch.equal(attn_out, cache[f"blocks.{layer}.ln1_post.hook_out"])
        assert torch.equal(mlp_out, cache[f"blocks.{layer}.ln2_post.hook_out"])
        assert torch.equal(mid, pre + attn_out)
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"], mid + mlp_out)
        assert (attn_out - cache[f"blocks.{layer}.attn.hook_out"])[real].abs().max() > 1e-2
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed"] + [
        f"{n}_{kind}_out" for n in range(vlm.cfg.n_layers) for kind in ("attn", "mlp")
    ]
    final = cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"]
    assert (parts.sum(0) - final)[real].abs().max() <= 1e-4


SANDWICH_SITES = [
    ("blocks.1.attn.hook_out", lambda block: block.self_attn),
    ("blocks.1.hook_attn_out", lambda block: block.post_self_attn_layernorm),
    ("blocks.1.mlp.hook_out", lambda block: block.mlp),
    ("blocks.1.hook_mlp_out", lambda block: block.post_mlp_layernorm),
]


def test_an_edit_before_or_after_a_sandwich_norm_equals_that_edit_inside_hf(dense):
    """A vector added to the raw sublayer output goes through the norm; added to the normed output it
    goes straight into the stream. Each equals the same addition at HF's module, and the two differ."""
    vlm = dense.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    shift = torch.randn(vlm.cfg.d_model, generator=torch.Generator().manual_seed(0))

    def add(output):
        if isinstance(output, tuple):
            return (output[0] + shift, *output[1:])
        return output + shift

    results = {}
    for name, site in SANDWICH_SITES:
        ours = vlm.run_with_hooks(batch, fwd_hooks=[(name, lambda x, hook: x + shift)])
        with hf_hooks([(site(hf_blocks(dense)[1]), lambda module, args, output: add(output))]):
            theirs = hf_logits(dense, batch)
        assert (ours - theirs)[real].abs().max() <= TOL, name
        results[name] = ours
    clean = vlm(batch)
    for before, after in (
        (SANDWICH_SITES[0][0], SANDWICH_SITES[1][0]),
        (SANDWICH_SITES[2][0], SANDWICH_SITES[3][0]),
    ):
        assert (results[before] - results[after])[real].abs().max() > 1e-2
        assert (results[after] - clean)[real].abs().max() > 1e-2


# ---------------------------------------------------------------- GLM-4.5V's mixture of experts
def test_the_moe_layers_have_the_router_expert_and_shared_expert_hook_points(moe):
    vlm = moe.vlm
    names = vlm.hook_dict
    assert GLM_MOE_DENSE == 1 and tuple(vlm.adapter.routed_experts()) == MOE_LAYERS
    for layer in range(vlm.cfg.n_layers):
        sparse = layer in MOE_LAYERS
        assert f"blocks.{layer}.hook_mlp_out" in names
        assert f"blocks.{layer}.ln1_post.hook_out" not in names  # GLM-4.5's layer: no sandwich norms
        for suffix in (
            "mlp.gate.hook_out",
            "mlp.hook_expert_weights",
            "mlp.hook_expert_indices",
            "mlp.experts.hook_out",
            "mlp.shared_experts.hook_out",
            *(f"mlp.experts.{e}.hook_out" for e in range(E)),
        ):
            assert (f"blocks.{layer}.{suffix}" in names) == sparse, (layer, suffix)
        assert f"blocks.{layer}.mlp.experts.{E}.hook_out" not in names
    assert "blocks.0.mlp.dense_out.hook_out" in names  # the dense layer's down projection
    assert vlm.hf_model.config.get_text_config()._experts_implementation == "eager"


def grouped_sigmoid_routing(logits, bias, routed_scaling_factor):
    """GLM-4.5's routing by hand, token by token: sigmoid scores; with the correction bias, each group
    scored by its best two experts; the best ``topk_group`` groups kept; the top-k experts there;
    weights = their (unbiased) scores, renormalised, times the scaling factor."""
    chosen, weights = [], []
    per_group = E // GLM_MOE_GROUPS
    for row in logits:
        scores = row.sigmoid()
        biased = (scores + bias).tolist()
        groups = [sorted(biased[g * per_group : (g + 1) * per_group])[-2:] for g in range(GLM_MOE_GROUPS)]
        kept = sorted(range(GLM_MOE_GROUPS), key=lambda g: -sum(groups[g]))[:GLM_MOE_TOP_GROUPS]
        candidates = [e for e in range(E) if e // per_group in kept]
        top = sorted(candidates, key=lambda e: -biased[e])[:K]
        chosen.append(sorted(top))
        picked = scores[sorted(top)]
        weights.append(picked / picked.sum() * routed_scaling_factor)
    return torch.tensor(chosen), torch.stack(weights)


@SIDES
def test_router_hooks_equal_hfs_router_and_a_hand_reference(moe, padding_side):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool().reshape(-1)
    gates = {layer: hf_blocks(moe)[layer].mlp.gate for layer in MOE_LAYERS}
    routers = hf_module_outputs(gates, lambda: hf_logits(moe, batch))
    assert tuple(routers) == MOE_LAYERS
    cache = assert_router_hooks_equal_hf(vlm, batch, routers, E)
    text_config = vlm.adapter.text_config
    grouping_mattered = False
    for layer in MOE_LAYERS:
        ours = cache[f"blocks.{layer}.mlp.gate.hook_out"]
        our_indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        scattered = cache[f"blocks.{layer}.mlp.hook_expert_weights"]  # [tokens, n_experts]
        bias = hf_blocks(moe)[layer].mlp.gate.e_score_correction_bias
        assert bias.abs().max() > 0, "the correction bias is drawn, so that it matters"
        hand_indices, hand_weights = grouped_sigmoid_routing(
            ours[real], bias, text_config.routed_scaling_factor
        )
        sorted_indices, order = our_indices[real].sort(-1)
        assert torch.equal(sorted_indices, hand_indices)
        assert (scattered[real].gather(-1, sorted_indices) - hand_weights).abs().max() <= TOL
        plain = (ours[real].sigmoid() + bias).topk(K, dim=-1).indices.sort(-1).values
        grouping_mattered |= not torch.equal(plain, hand_indices)
    assert grouping_mattered, "some token's plain top-k must fall outside its kept group"


@SIDES
def test_expert_and_shared_expert_outputs_make_the_mlp_term(moe, padding_side):
    """Each routed expert's hook holds its weighted output at the rows routed to it, zero elsewhere; in
    expert order they sum, bit for bit, to ``mlp.experts.hook_out``; with the shared expert's output
    (HF's, 1e-5) that is ``hook_mlp_out``, the MLP term of ``decompose_resid``."""
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    shared = {}
    hooks = [
        (hf_blocks(moe)[layer].mlp.shared_experts, recorder(shared, f"s{layer}")) for layer in MOE_LAYERS
    ]
    with hf_hooks(hooks):
        hf_logits(moe, batch)
    _, cache = vlm.run_with_cache(batch)
    shape = (*batch.input_ids.shape, vlm.cfg.d_model)
    for layer in MOE_LAYERS:
        indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]
        total = summed_in_order(routed_expert_outputs(vlm, cache, batch, layer, E, indices))
        routed_sum = cache[f"blocks.{layer}.mlp.experts.hook_out"]
        assert torch.equal(total, routed_sum)
        shared_out = cache[f"blocks.{layer}.mlp.shared_experts.hook_out"]
        assert (shared_out - shared[f"s{layer}"])[real].abs().max() <= TOL
        assert torch.equal(routed_sum.reshape(shape) + shared_out, cache[f"blocks.{layer}.hook_mlp_out"])
    labels = assert_mlp_terms_sum_to_the_stream(vlm, cache, batch, tol=1e-4)
    assert labels == ["embed"] + [
        f"{n}_{kind}_out" for n in range(vlm.cfg.n_layers) for kind in ("attn", "mlp")
    ]


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(1, 0), (2, 5), (2, None)])
def test_zeroing_an_expert_through_its_hook_equals_the_edit_inside_hf(moe, padding_side, layer, expert):
    """A routed expert (its down projection zeroed in HF) or, for ``None``, the shared expert."""
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    mlp = hf_blocks(moe)[layer].mlp
    if expert is None:
        name, edit = (
            f"blocks.{layer}.mlp.shared_experts.hook_out",
            zeroed_in_hf(mlp.shared_experts.down_proj.weight),
        )
    else:
        name, edit = (
            f"blocks.{layer}.mlp.experts.{expert}.hook_out",
            zeroed_in_hf(mlp.experts.down_proj, expert),
        )
    assert_zeroed_hook_equals_hf_edit(moe, batch, name, edit, hf_logits)


def test_generate_with_an_expert_zeroed_equals_hf_generate_with_the_edit(moe):
    batch = moe.vlm.prepare(family_images(), PROMPTS, padding_side="left")
    edit = zeroed_in_hf(hf_blocks(moe)[2].mlp.experts.down_proj, 3)
    assert_generate_with_zeroed_hook_equals_hf_edit(moe, batch, "blocks.2.mlp.experts.3.hook_out", edit)


def test_routing_by_modality_counts_the_grouped_sigmoid_choices(moe):
    vlm = moe.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    routing = expert_routing(vlm, batch)
    assert routing.layers == MOE_LAYERS and routing.counts.shape == (len(MOE_LAYERS), 2, E)
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("mlp.gate.hook_out"))
    scale = vlm.adapter.text_config.routed_scaling_factor
    for i, layer in enumerate(MOE_LAYERS):
        bias = hf_blocks(moe)[layer].mlp.gate.e_score_correction_bias
        for m, modality in enumerate(routing.modalities):
            mask = getattr(batch, f"{modality}_mask").reshape(-1)
            chosen, _ = grouped_sigmoid_routing(cache[f"blocks.{layer}.mlp.gate.hook_out"][mask], bias, scale)
            assert routing.counts[i, m].tolist() == torch.bincount(chosen.reshape(-1), minlength=E).tolist()


# ---------------------------------------------------------------- GLM-4.6V with the MoE text model
def test_glm46v_with_the_moe_text_model_is_served_as_glm45v(tmp_path):
    hf_model, processor = tiny_glm46v(seed=1, directory=tmp_path, moe=True)
    reference = copy.deepcopy(hf_model)
    vlm = HookedVLM.from_hf(hf_model, processor)
    assert type(reference.model.language_model).__name__ == "Glm4vMoeTextModel"
    assert vlm.adapter.is_moe and tuple(vlm.adapter.routed_experts()) == MOE_LAYERS
    assert "blocks.2.mlp.shared_experts.hook_out" in vlm.hook_dict
    for side in ("left", "right"):
        batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
        real = batch.attention_mask.bool()
        logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
        out = reference(**dict(batch.inputs), output_attentions=True)
        assert (logits - out.logits)[real].abs().max() <= TOL
        pair = real[:, None, :, None] & real[:, None, None, :]
        for layer, pattern in enumerate(out.attentions):
            diff = (cache[f"blocks.{layer}.attn.hook_pattern"] - pattern).abs().masked_fill(~pair, 0)
            assert diff.max() <= TOL
        ours = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.1.mlp.experts.2.hook_out", ZERO)])
        with zeroed_in_hf(reference.model.language_model.layers[1].mlp.experts.down_proj, 2):
            theirs = reference(**dict(batch.inputs)).logits
        assert (ours - theirs)[real].abs().max() <= TOL


def test_glm46v_with_another_text_model_is_refused_in_one_line():
    """``Glm46VModel`` builds whatever text model its config names; only GLM-V's two are served."""
    config = Glm46VConfig(text_config={"model_type": "qwen2"})
    config.architectures = ["Glm46VForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match=r"'qwen2' text model is not supported.*'glm4v_text'"):
        adapter_class_for(config)
