"""BLIP-2 with an OPT backbone. What only this family has: the processor writes the Q-Former's query
slots before the already-padded text (under left padding the padding sits between them), OPT's
learned absolute positions (``hook_pos_embed``, offset 2) counted over real tokens as HF counts them,
the attention made step-by-step (transformer-lens's OPT attention hands it to HF, so its pattern was
read-only), and the Flan-T5 variants refused."""

from __future__ import annotations

import pytest
import torch
from transformers import Blip2Config, T5Config

from hooked_vllm import UnsupportedModelError
from hooked_vllm.adapters import adapter_class_for
from tests.conftest import Family, family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])


@pytest.fixture(scope="module")
def blip2(tmp_path_factory) -> Family:
    return Family("blip2", tmp_path_factory.mktemp("blip2"))


@SIDES
def test_image_mask_is_the_query_slots_before_the_padded_text(blip2, padding_side):
    vlm, config = blip2.vlm, blip2.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    n = config.num_query_tokens
    # every row starts with the n query slots, whatever its padding; nothing else is image
    assert (ids[:, :n] == config.image_token_id).all() and real[:, :n].all()
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    assert batch.image_mask.sum(-1).tolist() == [n] * len(batch)
    # the padding lies between the slots and the text under left padding, after the text under right
    pad = ~real
    if padding_side == "left":
        assert pad[:, n:].any() and all(pad[i, n : n + int(pad[i].sum())].all() for i in range(len(batch)))
    else:
        assert all(pad[i, real[i].sum() :].all() for i in range(len(batch)))
    bos = ids == vlm.tokenizer.bos_token_id
    assert (bos.sum(-1) == 1).all() and batch.special_mask[bos].all()
    # the queries are no patches: one non-spatial slot each
    for (slots,) in batch.image_slots:
        assert not slots.spatial and slots.grid[:, 2].tolist() == list(range(n))


@SIDES
def test_positions_are_hfs_own_over_real_tokens(blip2, padding_side):
    """OPT's decoder counts positions as ``cumsum(mask) * mask - 1`` when given none: on every real
    token that is our ``position_ids``, so HF's forward as the model card calls it (no positions)
    gives our logits, and ``hook_pos_embed`` is HF's ``embed_positions`` at those positions (+2)."""
    vlm, reference = blip2.vlm, blip2.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    mask = batch.attention_mask.long()
    hf_positions = torch.cumsum(mask, dim=1) * mask - 1
    assert torch.equal(batch.position_ids[real], hf_positions[real])
    logits, cache = vlm.run_with_cache(batch)
    theirs = reference(**batch.inputs).logits  # no position_ids: HF computes them from the mask
    assert (logits - theirs)[real].abs().max() <= TOL
    table = reference.language_model.model.decoder.embed_positions.weight
    assert torch.equal(cache["hook_pos_embed"][real], table[batch.position_ids + 2][real])
    stream = cache["hook_embed"] + cache["hook_pos_embed"]
    assert (stream - cache["blocks.0.hook_resid_pre"])[real].abs().max() <= TOL


def test_attention_scores_and_pattern_are_live(blip2):
    """``hook_attn_scores`` holds the scores before the softmax (transformer-lens's own OPT attention
    fires the pattern there, after HF has used it) and an edit to either changes the output."""
    vlm = blip2.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    real = batch.attention_mask.bool()
    clean, cache = vlm.run_with_cache(batch)
    pair = real[:, None, :, None] & real[:, None, None, :]
    for layer in range(vlm.cfg.n_layers):
        scores, pattern = cache["attn_scores", layer], cache["pattern", layer]
        assert ((scores.softmax(-1) - pattern).abs() * pair).max() <= TOL
        assert not torch.equal(scores, pattern)
    for name in ("blocks.1.attn.hook_attn_scores", "blocks.1.attn.hook_pattern"):
        edited = vlm.run_with_hooks(batch, fwd_hooks=[(name, lambda x, hook: x.flip(-1))])
        assert (edited - clean)[real].abs().max() > 1e-3, name


def test_different_images_give_different_prefixes(blip2):
    """The tiny model's image reaches the prefix (at HF's init scales it did not: 6e-8 apart)."""
    vlm = blip2.vlm
    one = vlm.prepare(family_images(seed=1), PROMPTS)
    two = vlm.prepare(family_images(seed=2), PROMPTS)
    _, cache_one = vlm.run_with_cache(one, names_filter="hook_visual_prefix")
    _, cache_two = vlm.run_with_cache(two, names_filter="hook_visual_prefix")
    prefix_one, prefix_two = cache_one["hook_visual_prefix"], cache_two["hook_visual_prefix"]
    assert (prefix_one - prefix_two).abs().max() > 0.1 * prefix_one.abs().max()


def test_flan_t5_backbone_is_refused_in_one_line():
    config = Blip2Config(text_config=T5Config(d_model=32, num_layers=1, num_heads=2).to_dict())
    config.architectures = ["Blip2ForConditionalGeneration"]
    assert not config.use_decoder_only_language_model
    with pytest.raises(UnsupportedModelError, match=r"'t5' \(encoder-decoder\) backbone") as refused:
        adapter_class_for(config)
    assert "\n" not in str(refused.value) and "blip2-opt" in str(refused.value)
