"""Aya Vision (SigLIP on dynamic tiles, pixel shuffle, Cohere 2 text model). The shared bar
(tests/test_families.py, tests/test_family_lenses.py) runs on the tiny model; this file checks what is
particular to it: which positions are image slots (the ``<|START_OF_IMG|>``...``<|END_OF_IMG|>``
structure and ``TILE_*`` text are special), the tile layout, the parallel attention + MLP block and
the residual decompositions on it, the sliding window and the missing logit scale."""

from __future__ import annotations

import copy

import pytest
import torch

from hooked_vllm import HookedVLM
from hooked_vllm.analysis import contextualization_from_cache
from hooked_vllm.tiny_models.aya_vision import tiny_aya_vision
from tests.conftest import family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
AYA = pytest.mark.parametrize("new_family", ["aya_vision"], indirect=True)
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
TOL = 1e-5
PER_TILE, SIDE = 16, 4  # a 4x4 grid of slots per tile (8x8 patches, pixel shuffle 2)


def max_diff(a, b, where):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[where].abs().max().item()


def tiles_of_test_images(new_family):
    """Tiles per test image, from GotOCR2's image processor: the canvas plus a thumbnail if > 1."""
    image_processor = new_family.processor.image_processor
    return [image_processor.get_number_of_image_patches(i.height, i.width, {}) for i in family_images()]


@AYA
@SIDES
def test_image_mask_is_the_patch_slots_and_the_tile_text_is_special(new_family, padding_side):
    vlm, config = new_family.vlm, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    tokenizer = vlm.tokenizer
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|START_OF_IMG|>", "<|END_OF_IMG|>"))
    tiles = tiles_of_test_images(new_family)
    assert tiles == [3, 3, 5]
    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    assert batch.image_mask.sum(-1).tolist() == [n * PER_TILE for n in tiles]
    assert [len(item[0]) for item in batch.image_slots] == [n * PER_TILE for n in tiles]
    expansion = vlm.adapter.image_text_mask(ids) & real
    for item in range(len(batch)):
        first, last = (ids[item] == start).nonzero().item(), (ids[item] == end).nonzero().item()
        assert torch.equal(expansion[item].nonzero().flatten(), torch.arange(first, last + 1))
        structure = expansion[item] & ~batch.image_mask[item]
        assert batch.special_mask[item][structure].all() and not batch.text_mask[item][structure].any()
        # the structure is the markers and the tile names, in the processor's order
        text = tokenizer.decode(ids[item][structure])
        crops = "".join(f"TILE_{i}" for i in range(1, tiles[item]))
        assert text == f"<|START_OF_IMG|>{crops}TILE_GLOBAL<|END_OF_IMG|>"
        assert tokenizer.decode(ids[item][batch.text_mask[item]]).strip() == PROMPTS[item]


@AYA
def test_layout_crops_then_thumbnail_each_a_row_major_shuffled_grid(new_family):
    """Tile 0 is the thumbnail (last in the sequence), tiles 1.. the crops; inside a tile slot k is
    the 2x2 patch block (row k // 4, col k % 4), as HF's ``pixel_shuffle`` puts it (run here on each
    patch's own coordinates)."""
    vlm, projector = new_family.vlm, new_family.reference.model.multi_modal_projector
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    k = torch.arange(PER_TILE)
    for item, tiles in enumerate(tiles_of_test_images(new_family)):
        (slots,) = batch.image_slots[item]
        order = slots.grid[::PER_TILE, 0].tolist()
        assert order == [*range(1, tiles), 0]
        for t in range(tiles):
            assert torch.equal(
                slots.grid[t * PER_TILE : (t + 1) * PER_TILE, 1:], torch.stack([k // 4, k % 4], -1)
            )
    side = 2 * SIDE
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, side * side, 2).double()
    blocks = projector.pixel_shuffle(coords).reshape(PER_TILE, 4, 2)  # each slot's 4 patches
    expected = torch.stack([k // 4, k % 4], -1)
    for patch in range(4):
        assert torch.equal(blocks[:, patch].long() // 2, expected)


@AYA
@SIDES
def test_parallel_block_hooks_are_hf_attention_and_mlp_outputs(new_family, padding_side):
    """One norm feeds attention and the MLP: ``resid_post = resid_pre + attn_out + mlp_out``; there is
    no ``hook_resid_mid`` and no ``ln2``. ``hook_attn_out`` and ``hook_mlp_out`` are HF's
    ``self_attn`` and ``mlp`` outputs, ``ln1.hook_out`` HF's ``input_layernorm`` output."""
    vlm, reference = new_family.vlm, new_family.reference
    assert vlm.cfg.parallel_attn_mlp
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    _, cache = vlm.run_with_cache(batch)
    assert not any(name.endswith(("hook_resid_mid", "ln2.hook_scale")) for name in cache.keys())
    recorded: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(module, args, output):
            recorded[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = []
    for layer, block in enumerate(reference.model.language_model.layers):
        for part in ("self_attn", "mlp", "input_layernorm"):
            handles.append(getattr(block, part).register_forward_hook(record(f"{layer}.{part}")))
    try:
        reference(**hf_forward_inputs(new_family, batch))
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(vlm.cfg.n_layers):
        parts = [cache[f"blocks.{layer}.hook_{part}"] for part in ("resid_pre", "attn_out", "mlp_out")]
        assert max_diff(sum(parts), cache[f"blocks.{layer}.hook_resid_post"], real) <= TOL
        assert max_diff(cache[f"blocks.{layer}.hook_attn_out"], recorded[f"{layer}.self_attn"], real) <= TOL
        assert max_diff(cache[f"blocks.{layer}.hook_mlp_out"], recorded[f"{layer}.mlp"], real) <= TOL
        assert (
            max_diff(cache[f"blocks.{layer}.ln1.hook_out"], recorded[f"{layer}.input_layernorm"], real) <= TOL
        )


@AYA
def test_decompositions_of_a_parallel_block(new_family):
    """``decompose_resid`` sums to each layer's stream; the MLP's input is ``resid_pre`` (no term of
    the layer's own attention, unlike a sequential block), normalised by ``ln1``; the per-head
    decomposition likewise; ``accumulated_resid`` refuses a ``resid_mid`` that does not exist."""
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    real = batch.attention_mask.bool()
    logits, cache = vlm.run_with_cache(batch)
    n = vlm.cfg.n_layers
    for layer in range(1, n + 1):
        stream = (
            cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]
        )
        stack, labels = cache.decompose_resid(layer=layer, return_labels=True)
        assert labels == ["embed", *(f"{i}_{part}_out" for i in range(layer) for part in ("attn", "mlp"))]
        assert max_diff(stack.sum(0), stream, real) <= TOL
        if layer == n:
            continue
        mlp_stack, mlp_labels = cache.decompose_resid(layer=layer, mlp_input=True, return_labels=True)
        assert mlp_labels == labels and torch.equal(mlp_stack, stack)
        normed = cache.decompose_resid(layer=layer, mlp_input=True, apply_ln=True).sum(0)
        assert max_diff(normed, cache[f"blocks.{layer}.ln1.hook_normalized"], real) <= TOL
        accumulated = cache.accumulated_resid(layer=layer, mlp_input=True)
        assert torch.equal(accumulated[-1], cache[f"blocks.{layer}.hook_resid_pre"])
        heads = cache.get_full_resid_decomposition(layer=layer, mlp_input=True, expand_neurons=False)
        assert max_diff(heads.sum(0), stream, real) <= TOL
    with pytest.raises(ValueError, match="parallel.*no resid_mid"):
        cache.accumulated_resid(incl_mid=True)
    with pytest.raises(ValueError, match="no blocks.0.hook_resid_mid .*parallel.*hook='resid_post'"):
        contextualization_from_cache(cache, batch.image_mask, batch.text_mask, hook="resid_mid")
    # the logit lens at the last layer is the logits (no logit scale: see below)
    lens = cache.accumulated_resid(apply_ln=True)[-1] @ vlm.W_U
    assert max_diff(lens, logits, real) <= TOL


@AYA
def test_no_logit_scale_and_the_sliding_window_bites(new_family):
    """HF's Aya Vision head applies no ``logit_scale`` (the text config's 0.25 is what Cohere 2's own
    ``Cohere2ForCausalLM`` would multiply by): ours neither, and the config is left as loaded. The
    sliding window (8) and the global layer without positions are exercised: HF with a window
    covering the prompt gives other logits."""
    vlm, reference = new_family.vlm, new_family.reference
    text_config = vlm.hf_model.config.get_text_config()
    assert text_config.logit_scale == 0.25 and vlm.cfg.logit_scale == 1.0
    assert vlm.adapter.text_config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    real = batch.attention_mask.bool()
    ours = vlm(batch)
    theirs = reference(**hf_forward_inputs(new_family, batch)).logits
    assert max_diff(ours, theirs, real) <= TOL
    assert max_diff(ours, theirs * text_config.logit_scale, real) > 1e-2

    wide = copy.deepcopy(reference)
    wide.config.get_text_config().sliding_window = batch.input_ids.shape[1]
    assert max_diff(ours, wide(**hf_forward_inputs(new_family, batch)).logits, real) > 1e-3


@AYA
def test_prompt_placeholder_need_not_be_a_token(new_family):
    """``<image>`` is text to this tokenizer (the processor replaces it before tokenising): the
    prompt's own tokens still line up with the processor's, and the instruction is the text."""
    vlm = new_family.vlm
    assert vlm.tokenizer.convert_tokens_to_ids("<image>") == vlm.tokenizer.unk_token_id
    batch = vlm.prepare(family_images()[:1], ["<image> then the words"])
    assert vlm.tokenizer.decode(batch.input_ids[0][batch.text_mask[0]]).strip() == "then the words"
    assert batch.image_mask.sum() == 3 * PER_TILE


@AYA
@SIDES
def test_several_images_in_one_prompt_and_none_in_another(new_family, padding_side):
    """Each image its own ``<|START_OF_IMG|>`` block and tiles; a text-only item has none; selecting
    items takes their images' tile rows of ``pixel_values`` along."""
    vlm, reference = new_family.vlm, new_family.reference
    a, b, c = family_images()
    batch = vlm.prepare([[a, b], [], c], ["two", "none at all", "one"], padding_side=padding_side)
    assert [[len(slots) for slots in item] for item in batch.image_slots] == [[48, 48], [], [80]]
    real = batch.attention_mask.bool()
    logits = vlm(batch)
    assert max_diff(logits, reference(**hf_forward_inputs(new_family, batch)).logits, real) <= TOL
    sub = batch.select([2, 0])
    pixels = batch.inputs["pixel_values"]
    assert torch.equal(sub.inputs["pixel_values"], torch.cat([pixels[6:], pixels[:6]]))
    assert max_diff(vlm(sub), logits[[2, 0]], sub.attention_mask.bool()) <= TOL


def test_compatibility_mode_keeps_the_log_probs_and_folds_no_logit_scale(tmp_path):
    """TransformerLens's weight processing (fold_ln into the parallel block's attention and MLP, centre
    the writing weights and the unembedding) keeps HF Aya Vision's log-probs: transformer-lens's
    ``cohere`` adapter folds ``cfg.logit_scale`` into ``W_U`` there, 1 on our view (HF's head has none)."""
    hf_model, processor = tiny_aya_vision(directory=tmp_path)
    generator = torch.Generator().manual_seed(0)
    for name, parameter in hf_model.named_parameters():  # norm weights away from one: fold_ln matters
        if "norm" in name and parameter.dim() == 1 and "language_model" in name:
            parameter.data = 0.5 + torch.rand(parameter.shape, generator=generator)
    reference = copy.deepcopy(hf_model)
    vlm = HookedVLM.from_hf(hf_model, processor)
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    real = batch.attention_mask.bool()
    expected = reference(**batch.inputs, position_ids=batch.position_ids).logits.log_softmax(-1)[real]
    torch.testing.assert_close(vlm(batch).log_softmax(-1)[real], expected, rtol=1e-5, atol=1e-5)
    vlm.enable_compatibility_mode(disable_warnings=True)
    torch.testing.assert_close(vlm(batch).log_softmax(-1)[real], expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(vlm.ln_final.w, torch.ones_like(vlm.ln_final.w))
