"""Molmo 2 (tiny, fp32, eager) beyond the shared bar of tests/test_families.py and
tests/test_family_lenses.py: the image positions (``<im_patch>`` only: the low-resolution view, then
the crops' canvas), image features *added* to the patch tokens' embeddings (``hook_visual_prefix``
is the features: zeroing or doubling it == the same edit of HF's image features), one bidirectional
block of all an item's image tokens (across its images too), ``image_token_pooling`` re-based when
items are selected, each layer's own RoPE table, and what is refused."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.adapters import adapter_class_for
from hooked_vllm.errors import BatchFormatError, UnsupportedModelError
from tests.conftest import family_images
from tests.test_families import PROMPTS, hf_run, max_diff

TOL = 1e-5
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
MOLMO2 = pytest.mark.parametrize("new_family", ["molmo2"], indirect=True)
STRUCTURE = ("<im_col>", "<im_start>", "<low_res_im_start>", "<im_end>")


def prepared(family, padding_side="left"):
    return family.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)


def hf_with_features(family, batch, scale: float, **kwargs):
    """HF's output on ``batch`` with every image feature multiplied by ``scale`` inside its
    ``get_image_features``."""
    inner = family.reference.model
    original = inner.get_image_features

    def scaled(*args, **kw):
        out = original(*args, **kw)
        out.pooler_output = tuple(scale * p for p in out.pooler_output)
        return out

    inner.get_image_features = scaled
    try:
        return family.reference(**batch.inputs, position_ids=batch.position_ids, **kwargs)
    finally:
        del inner.get_image_features


# ---------------------------------------------------------------- image positions
@MOLMO2
@SIDES
def test_image_mask_is_exactly_the_patch_tokens(new_family, padding_side):
    """Image positions are the ``<im_patch>`` tokens, as many per image as its pooled low-resolution
    grid plus its canvas grid (``image_grids``); the markers, row ends and BOS are special, and each
    image's slots are laid out as tile 0 (low resolution) then tile 1 (canvas), row-major."""
    vlm, config = new_family.vlm, new_family.reference.config
    batch = prepared(new_family, padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    tokenizer = vlm.tokenizer
    assert torch.equal(batch.image_mask, (ids == config.image_patch_id) & real)
    grids = batch.inputs["image_grids"]
    counts = (grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]).tolist()
    assert batch.image_mask.sum(-1).tolist() == counts == [12, 12, 13]  # the builder's geometry
    for token in STRUCTURE:
        at = ids == tokenizer.convert_tokens_to_ids(token)
        assert at.any() and batch.special_mask[at].all()
    assert batch.special_mask[ids == tokenizer.convert_tokens_to_ids(tokenizer.bos_token)].all()
    # the bidirectional block is exactly the patches plus the structure tokens
    block = batch.inputs["mm_token_type_ids"] == 1
    assert torch.equal(block, vlm.adapter.image_text_mask(ids) & real)
    assert torch.equal(batch.image_mask, block & (ids == config.image_patch_id))
    for (low_rows, low_cols, high_rows, high_cols), (slots,) in zip(grids.tolist(), batch.image_slots):
        low, high = slots.patch_index()[0], slots.patch_index()[1]
        assert low.shape == (low_rows, low_cols) and high.shape == (high_rows, high_cols)
        assert torch.equal(low.flatten(), torch.arange(low_rows * low_cols))
        assert torch.equal(high.flatten(), low_rows * low_cols + torch.arange(high_rows * high_cols))
    # each image row of patches is closed by <im_col>: the canvas of item 0 is 2 x 4
    item = ids[0][real[0]].tolist()
    start = item.index(tokenizer.convert_tokens_to_ids("<im_start>"))
    patch, col = config.image_patch_id, tokenizer.convert_tokens_to_ids("<im_col>")
    assert item[start + 1 : start + 11] == [patch] * 4 + [col] + [patch] * 4 + [col]


# ---------------------------------------------------------------- additive image features
@MOLMO2
@SIDES
def test_features_are_added_to_the_patch_embedding(new_family, padding_side):
    """``hook_embed`` at the image positions is ``<im_patch>``'s own embedding plus
    ``hook_visual_prefix``, bit for bit; zeroing the hook leaves the bare embedding there, and
    HF's input embeddings with its image features zeroed are the same."""
    vlm, reference = new_family.vlm, new_family.reference
    batch = prepared(new_family, padding_side)
    real, image = batch.attention_mask.bool(), batch.image_mask
    patch_embedding = reference.get_input_embeddings().weight[reference.config.image_patch_id]
    _, cache = vlm.run_with_cache(batch, names_filter=["hook_embed", "hook_visual_prefix"])
    prefix = cache["hook_visual_prefix"]
    assert prefix.abs().mean() > 0.1 * patch_embedding.abs().mean(), "the features must matter"
    assert torch.equal(cache["hook_embed"][image], patch_embedding + prefix)

    zero = [("hook_visual_prefix", lambda x, hook: torch.zeros_like(x))]
    with vlm.hooks(fwd_hooks=zero):
        _, ablated = vlm.run_with_cache(batch, names_filter="hook_embed")
    assert torch.equal(ablated["hook_embed"][image], patch_embedding.expand(int(image.sum()), -1))
    theirs = hf_with_features(new_family, batch, 0.0, output_hidden_states=True).hidden_states[0]
    assert max_diff(ablated["hook_embed"], theirs, real) == 0.0


@MOLMO2
@SIDES
def test_scaling_the_visual_prefix_equals_scaling_hf_features(new_family, padding_side):
    """Doubling ``hook_visual_prefix`` == doubling HF's image features (logits and every layer): the
    hook holds what HF adds, not the sum."""
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    real = batch.attention_mask.bool()
    double = [("hook_visual_prefix", lambda x, hook: 2 * x)]
    with vlm.hooks(fwd_hooks=double):
        logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_resid_post"))
    theirs = hf_with_features(new_family, batch, 2.0, output_hidden_states=True)
    assert max_diff(logits, theirs.logits, real) <= TOL
    for layer in range(vlm.cfg.n_layers):
        # HF's hidden_states[-1] is after the final norm: compare layer outputs up to the last
        if layer + 1 < vlm.cfg.n_layers:
            assert max_diff(cache["resid_post", layer], theirs.hidden_states[layer + 1], real) <= TOL
    assert max_diff(logits, vlm(batch), real) > 1e-3, "doubling must change something"


# ---------------------------------------------------------------- one bidirectional image block
@MOLMO2
def test_all_image_tokens_of_an_item_form_one_bidirectional_block(new_family):
    """Two images in one prompt, one in another: every image token (patches and structure, of both
    images) attends to every other of its item, later ones included, as in HF (patterns and logits
    1e-5); text stays causal and never reads a later image token; the mask is the hand-written one."""
    vlm = new_family.vlm
    images = family_images()
    batch = vlm.prepare([[images[0], images[2]], images[1]], ["Compare the two.", "cat"])
    ids, real = batch.input_ids, batch.attention_mask.bool()
    assert len(batch.image_slots[0]) == 2
    logits, cache = vlm.run_with_cache(batch)
    out, _ = hf_run(new_family, batch, output_attentions=True)
    assert max_diff(logits, out.logits, real) <= TOL

    n = ids.shape[1]
    block = vlm.adapter.image_text_mask(ids) & real
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None] & real[:, None, :]
    allowed = causal | (block[:, :, None] & block[:, None, :])
    mask = vlm.adapter.lm_attention_mask(
        batch.inputs, torch.zeros(*ids.shape, vlm.cfg.d_model), batch.position_ids
    )
    rows = real[:, None, :, None].expand_as(mask)
    assert torch.equal((mask == 0)[rows], allowed[:, None].expand_as(mask)[rows])

    pair = real[:, :, None] & real[:, None, :]
    later_image = block[:, :, None] & block[:, None, :] & ~causal
    first_image_reads_second = later_image.clone()
    first_image_reads_second[1:] = False  # item 0: its first image's tokens read its second's
    assert first_image_reads_second.any()
    for layer in range(vlm.cfg.n_layers):
        pattern = cache["pattern", layer]
        assert ((pattern - out.attentions[layer]).abs() * pair[:, None]).max() <= TOL
        assert pattern.sum(1)[later_image].min() > 0
        assert pattern.sum(1)[pair & ~allowed].abs().max() == 0


# ---------------------------------------------------------------- selecting items
@MOLMO2
@SIDES
def test_selection_rebases_image_token_pooling(new_family, padding_side):
    """``image_token_pooling`` indexes the batch's flattened crop patches: a selected item's rows are
    the processor's own for that item alone (and stale offsets would read another image's crops)."""
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    assert vlm.adapter.image_index_inputs == {"image_token_pooling": "pixel_values"}
    for i in (2, 1):
        alone = vlm.prepare(family_images()[i : i + 1], PROMPTS[i : i + 1], padding_side=padding_side)
        sub = batch[i]
        for name in ("pixel_values", "image_token_pooling", "image_grids", "image_num_crops"):
            assert torch.equal(sub.inputs[name], alone.inputs[name]), (i, name)
    pair = batch.select([2, 0])
    offset = int(batch.inputs["image_num_crops"][2]) * batch.inputs["pixel_values"].shape[1]
    first, second = pair.inputs["image_token_pooling"][:13], pair.inputs["image_token_pooling"][13:]
    assert first[first >= 0].min() == 0 and second[second >= 0].min() == offset
    out, _ = hf_run(new_family, pair)  # HF on the selected inputs as they are
    assert max_diff(vlm(pair), out.logits, pair.attention_mask.bool()) <= TOL


# ---------------------------------------------------------------- the language model
@MOLMO2
def test_layers_get_their_own_rope_tables(new_family):
    """The builder scales RoPE on layers 0 and 2 only: the tables differ, so the shared parity test
    (every layer 1e-5) shows each layer got its own."""
    text_model = new_family.reference.model.language_model
    assert text_model.rope_types == ["scaled", "unscaled", "scaled"]
    x, positions = torch.zeros(1, 4, 1), torch.arange(4)[None]
    assert (
        text_model.rotary_emb(x, positions)[0] - text_model.rotary_emb_unscaled(x, positions)[0]
    ).abs().max() > 0.1


@MOLMO2
def test_post_norm_checkpoints_are_refused(new_family):
    config = new_family.reference.config.__class__.from_dict(new_family.reference.config.to_dict())
    config.text_config.norm_after = True
    with pytest.raises(UnsupportedModelError, match="norm_after=True"):
        adapter_class_for(config)(new_family.reference, new_family.processor)


@MOLMO2
def test_video_markers_are_refused_and_the_patch_token_is_not_one(new_family):
    """HF's config maps ``video_token_id`` to the image patch; the adapter's video ids are
    ``<|video|>`` and the frame markers."""
    vlm = new_family.vlm
    tokenizer = vlm.tokenizer
    patch = new_family.reference.config.image_patch_id
    assert patch not in vlm.adapter.video_token_ids
    assert tokenizer.convert_tokens_to_ids("<frame_start>") in vlm.adapter.video_token_ids
    batch = prepared(new_family)
    ids = batch.input_ids.clone()
    ids[0, batch.last_positions[0]] = tokenizer.convert_tokens_to_ids("<|video|>")
    with pytest.raises(BatchFormatError, match="video"):
        vlm({**batch.inputs, "input_ids": ids})


@MOLMO2
def test_text_alone_equals_hf_and_structure_tokens_are_prompt_markers(new_family):
    """Text without images runs causally, as HF's does (no ``mm_token_type_ids``, no block); image
    structure tokens written in a dataset's text are refused with the image markers."""
    vlm = new_family.vlm
    batch = vlm.to_batch(["a red circle left of the square", "cat"])
    assert batch.attention_mask.min() == 0 and "mm_token_type_ids" not in batch.inputs
    theirs = new_family.reference(**batch.inputs, position_ids=batch.position_ids).logits
    assert max_diff(vlm(batch), theirs, batch.attention_mask.bool()) <= TOL
    markers = vlm.adapter.prompt_markers
    for token in ("<|image|>", "<im_patch>", "<|video|>", *STRUCTURE):
        assert token in markers
