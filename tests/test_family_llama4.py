"""Llama 4: tiles plus a global view, chunked attention on the RoPE layers, full attention with
temperature tuning on the NoPE layers, and mixture-of-experts layers (sigmoid top-k router, experts
fed pre-scaled tokens, a shared expert) interleaved with dense ones. The shared bar
(tests/test_families.py, tests/test_family_lenses.py) runs on it as on every family; here, what only
this family has: the image positions among its structure tokens, the chunks (smaller than every
prompt in the tiny model), the attention hooks that transformer-lens leaves read-only on Llama 4 and
this adapter makes live, the router and per-expert hooks against HF's own modules, an expert zeroed
through its hook against the same edit inside HF, and the temperature tuning of the NoPE layers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import Llama4ForConditionalGeneration
from transformers.masking_utils import create_causal_mask
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

from hooked_vllm import HookedVLM
from hooked_vllm.adapters.base import no_kv_cache
from hooked_vllm.analysis.routing import expert_routing
from hooked_vllm.errors import GenerationArgumentError
from hooked_vllm.interventions import knockout
from hooked_vllm.tiny_models.llama4 import tiny_llama4
from tests.conftest import Family, family_images, hf_forward_inputs
from tests.moe_checks import (
    NEVER,
    TOL,
    assert_expert_hook_points,
    assert_generate_with_zeroed_hook_equals_hf_edit,
    assert_mlp_terms_sum_to_the_stream,
    assert_zeroed_hook_equals_hf_edit,
    hf_module_outputs,
    routed_expert_outputs,
    zeroed_in_hf,
)

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
E, K = 4, 2  # experts, experts per token (tiny_llama4)
MOE_LAYERS, DENSE_LAYERS = (1, 2), (0, 3)
CHUNKED_LAYERS, FULL_LAYERS = (0, 2), (1, 3)  # RoPE + chunks, NoPE + everything before
SLOTS_PER_TILE = 16
#: (crop rows, crop cols) of the family images (48x24, 24x48, 40x40), each plus a global view
CROPS = [(1, 2), (2, 1), (2, 2)]


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Family:
    return Family("llama4", tmp_path_factory.mktemp("llama4"))


def hf_blocks(family):
    return family.reference.language_model.model.layers


def hf_logits(family, batch):
    return family.reference(**hf_forward_inputs(family, batch)).logits


def token_id(family, token):
    return family.processor.tokenizer.convert_tokens_to_ids(token)


# ---------------------------------------------------------------- image positions
@SIDES
def test_image_mask_is_the_patch_slots_and_the_structure_is_special(llama4, padding_side):
    vlm, config = llama4.vlm, llama4.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    tiles = [rows * cols + 1 for rows, cols in CROPS]
    assert batch.image_mask.sum(-1).tolist() == [SLOTS_PER_TILE * n for n in tiles]
    structure = [
        "<|image_start|>",
        "<|image|>",
        "<|tile_x_separator|>",
        "<|tile_y_separator|>",
        "<|image_end|>",
    ]
    for token in structure:
        assert batch.special_mask[ids == token_id(llama4, token)].all(), token
    count = {token: (ids == token_id(llama4, token)).sum(-1).tolist() for token in structure}
    assert count["<|image_start|>"] == count["<|image|>"] == count["<|image_end|>"] == [1, 1, 1]
    assert count["<|tile_y_separator|>"] == [rows for rows, _ in CROPS]
    assert count["<|tile_x_separator|>"] == [rows * (cols - 1) for rows, cols in CROPS]
    # the expansion, <|image_start|> to <|image_end|>, is what the processor wrote for the image
    start, end = ids == token_id(llama4, "<|image_start|>"), ids == token_id(llama4, "<|image_end|>")
    inside = (start.long().cumsum(-1) - end.long().cumsum(-1) + end.long()).bool()
    assert torch.equal(vlm.adapter.image_text_mask(ids) & real, inside)
    # pixel rows: one per tile, cast exactly from the processor's bfloat16
    assert vlm.adapter.image_input_rows(batch.inputs) == {"pixel_values": tiles}
    raw = llama4.processor(images=family_images(), text=batch.prompts, return_tensors="pt", padding=True)
    assert raw["pixel_values"].dtype == torch.bfloat16
    assert batch.inputs["pixel_values"].dtype == torch.float32
    assert torch.equal(batch.inputs["pixel_values"], raw["pixel_values"].float())


def test_layouts_put_the_crops_first_and_the_global_view_last_as_tile_0(llama4):
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    k = torch.arange(SLOTS_PER_TILE)
    grid = torch.stack([k // 4, k % 4], dim=-1)  # 8x8 patches, pixel-shuffled 2x2: a 4x4 row-major grid
    for item, (rows, cols) in enumerate(CROPS):
        (slots,) = batch.image_slots[item]
        labels = [*range(1, rows * cols + 1), 0]
        expected = torch.cat([torch.cat([torch.full((SLOTS_PER_TILE, 1), t), grid], -1) for t in labels])
        assert torch.equal(slots.grid, expected)
        assert slots.is_patch.all()


def test_an_image_of_one_tile_has_no_global_view(llama4):
    """A 16x16 image fits one tile: ``<|image_start|><|image|>``, its 16 slots, ``<|image_end|>``, one
    row of ``pixel_values``, tile 0 alone; the logits are HF's."""
    vlm = llama4.vlm
    image = family_images()[2].resize((16, 16))
    batch = vlm.prepare([image, *family_images()[:1]], PROMPTS[:2], padding_side="right")
    assert batch.image_mask.sum(-1).tolist() == [SLOTS_PER_TILE, 3 * SLOTS_PER_TILE]
    assert vlm.adapter.image_input_rows(batch.inputs) == {"pixel_values": [1, 3]}
    assert (batch.input_ids[0] == token_id(llama4, "<|tile_y_separator|>")).sum() == 0
    assert torch.equal(batch.image_slots[0][0].grid[:, 0], torch.zeros(SLOTS_PER_TILE, dtype=torch.long))
    real = batch.attention_mask.bool()
    assert (vlm(batch) - hf_logits(llama4, batch))[real].abs().max() <= TOL


# ---------------------------------------------------------------- chunked attention
def chunk_of(batch, chunk_size):
    """Each position's chunk: positions counted from the item's first real token."""
    return batch.position_ids // chunk_size


@SIDES
def test_chunked_layers_read_their_own_chunk_only(llama4, padding_side):
    """On the RoPE layers a query's weights sum to 1 over the keys of its own chunk (24 positions; every
    prompt is longer); the NoPE layers put weight on earlier chunks. A causal mask on every layer in
    place of the chunks changes HF's logits."""
    vlm, reference = llama4.vlm, llama4.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    size = vlm.adapter.text_config.attention_chunk_size
    real = batch.attention_mask.bool()
    assert size == 24 and (real.sum(-1) > 3 * size).all()
    chunk = chunk_of(batch, size)
    pairs = real[:, :, None] & real[:, None, :] & torch.ones(real.shape[1], real.shape[1]).tril().bool()
    same = chunk[:, :, None] == chunk[:, None, :]
    assert (pairs & ~same).sum() > 1000, "many causal pairs cross a chunk boundary"
    logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_pattern"))
    for layer in CHUNKED_LAYERS:
        pattern = cache["pattern", layer]  # [batch, head, query, key]
        assert pattern.masked_select((pairs & ~same)[:, None]).abs().max() == 0
        in_chunk = (pattern * (pairs & same)[:, None]).sum(-1)
        assert (in_chunk - 1).abs()[real[:, None].expand_as(in_chunk)].max() <= 1e-5
    for layer in FULL_LAYERS:
        assert cache["pattern", layer].masked_select((pairs & ~same)[:, None]).sum() > 1
    embeds, _ = vlm._embed_with_injections(batch)
    causal = create_causal_mask(
        config=vlm.adapter.text_config,
        inputs_embeds=embeds,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        **no_kv_cache(create_causal_mask),
    )
    language_model = reference.language_model
    hidden = language_model.model(
        inputs_embeds=embeds,
        attention_mask={"full_attention": causal, "chunked_attention": causal},
        position_ids=batch.position_ids,
    ).last_hidden_state
    assert (language_model.lm_head(hidden) - logits)[real].abs().max() > 1e-2, "the chunks must matter"


# ---------------------------------------------------------------- live attention hooks
def test_attention_hooks_are_live_and_hold_hfs_scores(llama4):
    """transformer-lens 4.3 keeps Llama 4's attention native (``hook_attn_scores`` fired on the
    pattern, edits discarded); here the pattern is the softmax of ``hook_attn_scores``, the NoPE
    layers' ``hook_rot_q`` is ``hook_q`` (no rotation, no norm; temperature 1 below 8192 slots), the
    RoPE layers' is HF's rotation then L2 norm of ``hook_q``, and zeroing a head's pattern equals HF
    with that head's columns of ``o_proj`` zeroed."""
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    clean, cache = vlm.run_with_cache(batch)
    for layer in range(vlm.cfg.n_layers):
        attn = vlm.blocks[layer].attn
        assert not attn.maintain_native_attention
        scores, pattern = cache["attn_scores", layer], cache["pattern", layer]
        assert (torch.softmax(scores, -1) - pattern).abs().max() <= 1e-6
        rot_q, q = cache[f"blocks.{layer}.attn.hook_rot_q"], cache["q", layer]
        if layer in FULL_LAYERS:
            assert torch.equal(rot_q, q)
        else:  # HF's rotation at our positions, then its L2 norm, on hook_q
            freqs = llama4.reference.language_model.model.rotary_emb(q, batch.position_ids)
            rotated, _ = apply_rotary_emb(q, q, freqs)
            expected = hf_blocks(llama4)[layer].self_attn.qk_norm(rotated)
            assert (rot_q - expected)[real].abs().max() <= 1e-6 and not torch.equal(rot_q, q)
    d_head = vlm.cfg.d_head
    for layer, head in [(1, 2), (2, 0)]:

        def zero_head(pattern, hook, head=head):
            pattern = pattern.clone()
            pattern[:, head] = 0
            return pattern

        ours = vlm.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.attn.hook_pattern", zero_head)])
        weight = hf_blocks(llama4)[layer].self_attn.o_proj.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[:, head * d_head : (head + 1) * d_head] = 0
        try:
            theirs = hf_logits(llama4, batch)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert (ours - theirs)[real].abs().max() <= TOL
        assert (ours - clean)[real].abs().max() > 1e-3, "the edit must change something"


# ---------------------------------------------------------------- mixture of experts
def zero_expert_in_hf(family, layer, expert):
    """HF's own edit: expert ``expert``'s down projection at ``layer`` set to zero, undone on exit."""
    return zeroed_in_hf(hf_blocks(family)[layer].feed_forward.experts.down_proj, expert)


def hf_routers(family, batch):
    """``{layer: (scores, logits)}`` as HF's router modules of the MoE layers return them."""
    routers = {layer: hf_blocks(family)[layer].feed_forward.router for layer in MOE_LAYERS}
    return hf_module_outputs(routers, lambda: hf_logits(family, batch))


def test_moe_and_dense_layers_have_their_hook_points(llama4):
    vlm = llama4.vlm
    names = vlm.hook_dict
    assert tuple(vlm.adapter.routed_experts()) == MOE_LAYERS
    for layer in range(vlm.cfg.n_layers):
        moe = layer in MOE_LAYERS
        assert f"blocks.{layer}.hook_mlp_out" in names
        for suffix in ("mlp.hook_router_scores", "mlp.router.hook_out", "mlp.shared_expert.hook_out"):
            assert (f"blocks.{layer}.{suffix}" in names) == moe, (layer, suffix)
        assert_expert_hook_points(names, layer, E, present=moe)
        assert (f"blocks.{layer}.mlp.dense_out.hook_out" in names) == (not moe)


@SIDES
def test_router_hooks_equal_hfs_router(llama4, padding_side):
    """``mlp.hook_router_scores`` (transformer-lens's name) holds the router's logits, ``mlp.router.hook_out``
    its scores (the sigmoid of the top-k logits, 0 elsewhere), as HF's router modules return them."""
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool().reshape(-1)
    routers = hf_routers(llama4, batch)
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: ".mlp.router." in n or "router_scores" in n)
    for layer, (scores, logits) in routers.items():
        ours = cache[f"blocks.{layer}.mlp.hook_router_scores"]
        assert ours.shape == (real.numel(), E)
        assert (ours - logits)[real].abs().max() <= TOL
        assert (cache[f"blocks.{layer}.mlp.router.hook_out"] - scores)[real].abs().max() <= TOL
        assert torch.equal((scores[real] > 0).sum(-1), torch.full((int(real.sum()),), K))


@SIDES
def test_expert_outputs_and_the_shared_expert_sum_to_the_mlp_term(llama4, padding_side):
    """Each expert's hook is zero exactly at the rows not routed to it (top-k of the router logits);
    the shared expert plus the experts' sum is ``hook_mlp_out`` bit for bit, the MLP term
    ``decompose_resid`` counts, and the terms sum to the stream."""
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    _, cache = vlm.run_with_cache(batch)
    shape = (*batch.input_ids.shape, vlm.cfg.d_model)
    for layer in MOE_LAYERS:
        chosen = cache[f"blocks.{layer}.mlp.hook_router_scores"].topk(K, dim=-1).indices
        outputs = routed_expert_outputs(vlm, cache, batch, layer, E, chosen)
        total = cache[f"blocks.{layer}.mlp.shared_expert.hook_out"].clone()
        total.add_(torch.stack(outputs).sum(0))  # as HF adds them
        assert torch.equal(total.reshape(shape), cache[f"blocks.{layer}.hook_mlp_out"])
    labels = assert_mlp_terms_sum_to_the_stream(vlm, cache, batch)
    assert labels == ["embed"] + [f"{layer}_{part}_out" for layer in range(4) for part in ("attn", "mlp")]


@SIDES
@pytest.mark.parametrize(("layer", "expert"), [(1, 0), (2, 3)])
def test_zeroing_an_expert_through_its_hook_equals_the_edit_inside_hf(llama4, padding_side, layer, expert):
    batch = llama4.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    name = f"blocks.{layer}.mlp.experts.{expert}.hook_out"
    edit = zero_expert_in_hf(llama4, layer, expert)
    assert_zeroed_hook_equals_hf_edit(llama4, batch, name, edit, hf_logits)


def test_generate_with_an_expert_zeroed_equals_hf_generate_with_the_edit(llama4):
    """The hook fires at every decoding step too: tokens and every step's logits."""
    batch = llama4.vlm.prepare(family_images(), PROMPTS, padding_side="left")
    assert_generate_with_zeroed_hook_equals_hf_edit(
        llama4, batch, "blocks.2.mlp.experts.1.hook_out", zero_expert_in_hf(llama4, 2, 1)
    )


# ---------------------------------------------------------------- temperature tuning
def test_temperature_tuning_counts_slots_as_hf_does(tmp_path):
    """With ``floor_scale`` 16 the NoPE layers scale their queries from slot 15 on. HF counts slots,
    padding included: our logits are HF's on both padding sides, a right-padded item alone equals its
    batched self, and a left-padded one does not, in HF as here (the documented trap; with the real
    ``floor_scale`` of 8192 it starts at 8191 slots)."""
    hf_model, processor = tiny_llama4(directory=tmp_path, floor_scale=16)
    reference = copy.deepcopy(hf_model)
    vlm = HookedVLM.from_hf(hf_model, processor)
    family = Family.__new__(Family)
    family.name, family.reference, family.vlm = "llama4", reference, vlm
    for side in ("left", "right"):
        batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
        real = batch.attention_mask.bool()
        batched = vlm(batch)
        assert (batched - hf_logits(family, batch))[real].abs().max() <= TOL
        i = int(real.sum(-1).argmin())
        alone_batch = vlm.prepare(family_images()[i : i + 1], PROMPTS[i : i + 1], padding_side=side)
        alone = vlm(alone_batch)[0]
        hf_alone = hf_logits(family, alone_batch)[0]
        assert (alone - hf_alone).abs().max() <= TOL
        drift = (batched[i][real[i]] - alone).abs().max()
        assert drift <= TOL if side == "right" else drift > 1e-3, (side, drift)


def test_right_padded_generate_with_a_hook_is_refused_naming_the_chunks(llama4):
    """Chunks count cache slots when decoding, so generation re-pads a right-padded batch to the left;
    with a hook in effect that is refused, and the message names the chunked layers."""
    vlm = llama4.vlm
    assert vlm.adapter.decodes_left_padded
    right = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    with vlm.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x)]):
        with pytest.raises(GenerationArgumentError, match="chunked attention layers.*hooks in effect"):
            vlm.generate(right, 2, eos_token_id=NEVER)


@SIDES
def test_routing_by_modality_equals_a_hand_count_from_hfs_router(llama4, padding_side):
    """``expert_routing`` on Llama 4 (no ``hook_expert_indices``: the top k of the router logits) counts,
    per MoE layer and modality, the experts HF's router gave a nonzero score, position by position."""
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    routing = expert_routing(vlm, batch)
    assert routing.layers == MOE_LAYERS and routing.counts.shape == (len(MOE_LAYERS), 2, E)
    scores = {layer: out[0] for layer, out in hf_routers(llama4, batch).items()}
    width = batch.input_ids.shape[1]
    for i, layer in enumerate(MOE_LAYERS):
        for m, modality in enumerate(routing.modalities):
            mask = getattr(batch, f"{modality}_mask")
            counts = [0] * E
            for item, pos in mask.nonzero().tolist():
                for expert in (scores[layer][item * width + pos] > 0).nonzero().flatten().tolist():
                    counts[expert] += 1
            assert routing.counts[i, m].tolist() == counts
    assert torch.equal(routing.counts.sum(-1), K * routing.tokens.expand(len(MOE_LAYERS), 2))


def test_knockout_that_empties_a_chunk_warns(llama4):
    """``("image", "image")`` blocked: the first image slots of a chunk that starts inside the image have
    no key left on the chunked layers (11, 11 and 13 per item here). HF's softmax, given that mask,
    spreads them over every position, padding included: the most-padded item alone then differs
    from its batched self. Knockout says so, naming the layers; edges that leave every query a key
    (image -> text) stay silent."""
    vlm = llama4.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    with pytest.warns(RuntimeWarning, match="35 real query position") as record:
        with knockout(vlm, batch, edges=[("image", "image")]):
            batched = vlm(batch)
    assert {str(w.message).split(" at ")[1].split(":")[0] for w in record} == {
        f"blocks.{layer}.attn.hook_attn_scores" for layer in CHUNKED_LAYERS
    }
    i = int(batch.attention_mask.sum(-1).argmin())
    alone_batch = vlm.prepare(family_images()[i : i + 1], PROMPTS[i : i + 1])
    with pytest.warns(RuntimeWarning), knockout(vlm, alone_batch, edges=[("image", "image")]):
        alone = vlm(alone_batch)[0]
    assert (batched[i][batch.attention_mask[i].bool()] - alone).abs().max() > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with knockout(vlm, batch, edges=[("image", "text")]):
            vlm(batch)


def test_bfloat16_model_takes_the_processors_pixels_and_equals_hf(tmp_path, monkeypatch):
    """Llama 4 is run in bfloat16: loaded so (``from_pretrained(..., dtype=torch.bfloat16)``), the
    processor's bfloat16 pixels go in as they are, the vision RoPE table stays complex, and the logits
    are HF's (loaded the same way) bit for bit, both padding sides."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_model, processor = tiny_llama4(directory=tmp_path / "build")
    hf_model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    vlm = HookedVLM.from_pretrained(str(tmp_path / "model"), dtype=torch.bfloat16)
    reference = Llama4ForConditionalGeneration.from_pretrained(
        tmp_path / "model", dtype=torch.bfloat16, attn_implementation="eager"
    )
    assert vlm.hf_model.vision_model.rotary_embedding.freqs_ci.is_complex()
    family = Family.__new__(Family)
    family.name, family.reference, family.vlm = "llama4", reference, vlm
    for side in ("left", "right"):
        batch = vlm.prepare(family_images(), PROMPTS, padding_side=side)
        assert batch.inputs["pixel_values"].dtype == torch.bfloat16
        real = batch.attention_mask.bool()
        logits = vlm(batch)
        assert logits.dtype == torch.bfloat16
        assert torch.equal(logits[real], hf_logits(family, batch)[real])
