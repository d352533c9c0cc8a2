"""PaliGemma and PaliGemma 2 (tiny, fp32, eager) beyond the shared bar of tests/test_families.py and
tests/test_family_lenses.py: the prompt layout (image tokens before BOS, the closing newline), the
image positions, 1-indexed positions, the prefix-LM mask (prompt both ways, suffix causal; PaliGemma
2's sliding windows), a suffix given to the processor (``token_type_ids`` 1, ``labels`` dropped) and
generation from it, Gemma's embedding scale, and PaliGemma 2's soft-capped logits."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.analysis.collect import allowed_pairs
from hooked_vllm.model.generation import next_position_ids
from tests.conftest import family_images
from tests.test_families import NEVER, PROMPTS, hf_run, max_diff

TOL = 1e-5
PALIGEMMAS = pytest.mark.parametrize("new_family", ["paligemma", "paligemma2"], indirect=True)
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])


def prepared(family, padding_side="left"):
    return family.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)


def suffixed(family, padding_side="left", suffixes=("a cat", "the square is", "two dogs")):
    """A batch whose processor call got a ``suffix`` per item (the answer, causal): the raw
    processor output, ``labels`` included, through ``to_batch``."""
    vlm = family.vlm
    prompts = [vlm.adapter.format_prompt(p, 1)[0] for p in PROMPTS]
    inputs = family.processor(
        images=family_images(),
        text=prompts,
        suffix=list(suffixes),
        return_tensors="pt",
        padding=True,
        padding_side=padding_side,
    )
    assert "labels" in inputs
    return vlm.to_batch(dict(inputs))


def hf_logits(family, batch, **kwargs):
    return family.reference(**batch.inputs, position_ids=batch.position_ids, **kwargs)


# ---------------------------------------------------------------- prompt and image positions
@PALIGEMMAS
@SIDES
def test_image_mask_is_exactly_the_image_tokens_before_bos(new_family, padding_side):
    """Each item: 16 image tokens (a 4x4 grid, whatever the image's size) at the start of its real
    tokens, then BOS, the instruction, the processor's newline; BOS and newline are special."""
    vlm, config = new_family.vlm, new_family.reference.config
    batch = prepared(new_family, padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    tokenizer = vlm.tokenizer
    side = config.vision_config.image_size // config.vision_config.patch_size
    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    assert batch.image_mask.sum(-1).tolist() == [side * side] * len(batch)
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    assert len(newline) == 1
    for i, instruction in enumerate(PROMPTS):
        tokens = ids[i][real[i]].tolist()
        assert tokens[: side * side] == [config.image_token_id] * side * side
        assert tokens[side * side] == tokenizer.bos_token_id
        assert tokens[-1] == newline[0]
        positions = real[i].nonzero().flatten()
        assert batch.special_mask[i, positions[side * side]] and batch.special_mask[i, positions[-1]]
        assert tokenizer.decode(ids[i][batch.text_mask[i]]).strip() == instruction
        (slots,) = batch.image_slots[i]
        assert slots.is_patch.all()
        assert torch.equal(slots.grid[:, 1:], torch.cartesian_prod(torch.arange(side), torch.arange(side)))
    assert (batch.inputs["token_type_ids"][real] == 0).all()  # the whole prompt is prefix
    assert "labels" not in batch.inputs


@PALIGEMMAS
def test_two_images_in_one_prompt_are_back_to_back_before_bos(new_family):
    vlm = new_family.vlm
    images = family_images()
    batch = vlm.prepare([images[:2], images[2:]], ["Compare them.", "cat"], padding_side="right")
    prompt, _ = vlm.adapter.format_prompt("Compare them.", 2)
    assert prompt == "<image><image>Compare them."
    assert [len(item) for item in batch.image_slots] == [2, 1]
    assert batch.ranges("image") == [[(0, 32)], [(0, 16)]]
    assert batch.input_ids[0, 32] == vlm.tokenizer.bos_token_id
    real = batch.attention_mask.bool()
    assert max_diff(vlm(batch), hf_logits(new_family, batch).logits, real) <= TOL


# ---------------------------------------------------------------- positions
@PALIGEMMAS
@SIDES
def test_positions_are_one_indexed_over_real_tokens(new_family, padding_side):
    """``cumsum(mask)``, as HF's ``generate`` gives them; decoding continues at length + 1. RoPE is
    relative, so a uniform shift (0-indexed positions) changes the prompt's logits only by rounding:
    counting over real tokens is what keeps right-padded decoding right (tests/test_families.py)."""
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    real = batch.attention_mask.bool()
    counted = batch.attention_mask.long().cumsum(-1)
    assert torch.equal(batch.position_ids[real], counted[real])
    assert batch.position_ids[real].min() == 1
    assert torch.equal(
        next_position_ids(batch.position_ids, batch.attention_mask).flatten(), real.sum(-1) + 1
    )
    # HF's forward without positions counts from 1 too (arange + 1): equal on an unpadded item
    alone = vlm.prepare(family_images()[:1], PROMPTS[:1])
    theirs = new_family.reference(**alone.inputs).logits
    assert (vlm(alone) - theirs).abs().max() <= TOL
    embeds = vlm.embed(batch)
    inputs = vlm.lm_inputs(batch, embeds)
    shifted = vlm.bridge(embeds, attention_mask=inputs["attention_mask"], position_ids=batch.position_ids - 1)
    assert max_diff(shifted, vlm(batch), real) <= TOL


# ---------------------------------------------------------------- the prefix-LM mask
@PALIGEMMAS
def test_the_prompt_attends_both_ways(new_family):
    """Every real prompt token reads every other one, later ones included (the pattern puts weight
    there), and a plain causal mask would change the logits."""
    vlm = new_family.vlm
    batch = prepared(new_family)
    real = batch.attention_mask.bool()
    allowed = allowed_pairs(vlm, batch)
    assert torch.equal(allowed[real], (real[:, :, None] & real[:, None, :])[real])
    _, cache = vlm.run_with_cache(batch, names_filter="blocks.0.attn.hook_pattern")
    later = real[:, :, None] & real[:, None, :] & ~torch.ones_like(allowed[0]).tril()
    assert cache["pattern", 0].sum(1)[later].min() > 0
    embeds = vlm.embed(batch)
    causal = vlm.bridge(embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    assert max_diff(causal, vlm(batch), real) > 1e-3


@PALIGEMMAS
@SIDES
def test_a_suffix_is_causal_and_its_labels_never_reach_the_model(new_family, padding_side):
    """A processor suffix (training targets) is token type 1: causal, while the prefix stays
    bidirectional; logits, every layer and every pattern equal HF's with the same token types."""
    vlm = new_family.vlm
    batch = suffixed(new_family, padding_side)
    assert "labels" not in batch.inputs
    real = batch.attention_mask.bool()
    types = batch.inputs["token_type_ids"]
    prefix, suffix = (types == 0) & real, (types == 1) & real
    assert suffix.sum(-1).min() > 1
    logits, cache = vlm.run_with_cache(batch)
    out, residuals = hf_run(new_family, batch, output_attentions=True)
    assert max_diff(logits, out.logits, real) <= TOL
    pair = real[:, None, :, None] & real[:, None, None, :]
    for layer in range(vlm.cfg.n_layers):
        assert max_diff(cache[f"blocks.{layer}.hook_resid_post"], residuals[layer], real) <= TOL
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert (pattern - out.attentions[layer]).abs().masked_fill(~pair, 0).max() <= TOL
    allowed = allowed_pairs(vlm, batch)
    n = batch.input_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    naive = causal[None] & real[:, None, :] | prefix[:, :, None] & prefix[:, None, :]
    assert torch.equal(allowed[real], naive[real])
    future_suffix = suffix[:, :, None] & suffix[:, None, :] & ~causal
    assert cache["pattern", 1].sum(1)[future_suffix].abs().max() == 0
    future_prefix = prefix[:, :, None] & prefix[:, None, :] & ~causal
    assert cache["pattern", 1].sum(1)[future_prefix].min() > 0


@PALIGEMMAS
def test_generate_after_a_suffix_matches_hf(new_family):
    """Generation continues causally after a prompt whose end is a causal suffix (an answer's
    beginning): tokens and the logits of every step equal HF's ``generate``."""
    vlm, n = new_family.vlm, 4
    batch = suffixed(new_family, "left")
    tokens, cache = vlm.generate(
        batch, n, eos_token_id=NEVER, return_cache=True, names_filter="unembed.hook_out"
    )
    theirs = new_family.reference.generate(
        **batch.inputs,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=NEVER,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(tokens, theirs.sequences[:, batch.input_ids.shape[1] :])
    width = batch.input_ids.shape[1]
    ours = cache["unembed.hook_out"]
    ours = torch.cat([ours[torch.arange(len(batch)), batch.last_positions][:, None], ours[:, width:]], dim=1)
    cap = vlm.cfg.output_logits_soft_cap
    if cap > 0:
        ours = torch.tanh(ours / cap) * cap
    assert (ours - torch.stack(theirs.logits, dim=1)).abs().max() <= TOL


# ---------------------------------------------------------------- PaliGemma 2
@pytest.mark.parametrize("new_family", ["paligemma2"], indirect=True)
def test_paligemma2_sliding_window_spares_the_prefix(new_family):
    """HF's sliding mask for PaliGemma 2 is OR(window AND causal, prefix block): in the prompt pass
    every prefix pair is allowed in sliding layers too; a suffix reads only its window."""
    vlm = new_family.vlm
    window = vlm.adapter.sliding_window
    assert window == 6 and new_family.reference.config.text_config.layer_types[0] == "sliding_attention"
    batch = suffixed(new_family, "right", suffixes=("a cat sat on the red sofa by the window",) * 3)
    embeds = vlm.embed(batch)
    masks = vlm.lm_inputs(batch, embeds)["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    sliding = masks["sliding_attention"][:, 0] == 0
    real = batch.attention_mask.bool()
    types = batch.inputs["token_type_ids"]
    prefix, suffix = (types == 0) & real, (types == 1) & real
    n = batch.input_ids.shape[1]
    q, k = torch.arange(n)[:, None], torch.arange(n)[None]
    in_window = (k <= q) & (q - k < window)
    expected = (in_window[None] & real[:, None, :]) | (prefix[:, :, None] & prefix[:, None, :])
    assert torch.equal(sliding[real], expected[real])
    assert (prefix.sum(-1) > window).all() and (suffix.sum(-1) > window).all()
    real_logits = vlm(batch)
    assert max_diff(real_logits, hf_logits(new_family, batch).logits, real) <= TOL


@pytest.mark.parametrize("new_family", ["paligemma", "paligemma2"], indirect=True)
def test_embedding_scale_and_soft_caps(new_family):
    """Text embeddings are the table times sqrt(d_model), image slots the projector's output as HF
    computes it (unscaled); PaliGemma 2 soft-caps attention scores (50) and logits (30):
    ``unembed.hook_out`` holds the logits before the cap, the model's output after it."""
    vlm, reference = new_family.vlm, new_family.reference
    batch = prepared(new_family, "right")
    logits, cache = vlm.run_with_cache(batch, names_filter=["hook_embed", "unembed.hook_out"])
    ids, real = batch.input_ids, batch.attention_mask.bool()
    text = real & ~vlm.adapter.placeholder_mask(ids)
    table = reference.model.language_model.embed_tokens.weight
    scale = torch.tensor(vlm.cfg.d_model**0.5, dtype=table.dtype)
    assert torch.allclose(cache["hook_embed"][text], table[ids[text]] * scale, atol=1e-6)
    features = reference.model.get_image_features(pixel_values=batch.pixel_values).pooler_output
    assert torch.allclose(cache["hook_embed"][batch.image_mask], features.flatten(0, 1), atol=1e-6)
    text_config = reference.config.text_config
    if new_family.name == "paligemma2":
        assert text_config.final_logit_softcapping == 30.0 and text_config.attn_logit_softcapping == 50.0
        assert vlm.cfg.output_logits_soft_cap == 30.0
        capped = torch.tanh(cache["unembed.hook_out"] / 30.0) * 30.0
        assert max_diff(capped, logits, real) <= TOL
        assert max_diff(cache["unembed.hook_out"], logits, real) > 1e-4
    else:
        assert getattr(text_config, "final_logit_softcapping", None) is None
        assert max_diff(cache["unembed.hook_out"], logits, real) == 0


@PALIGEMMAS
def test_generated_tokens_are_the_causal_suffix(new_family):
    """The activations ``generate`` records equal one forward over the prompt and the new tokens
    (but the last) given token type 1 (the suffix), as HF's generate marks them: decoding with the
    2-D mask is the prefix-LM mask with the new tokens causal."""
    vlm, n = new_family.vlm, 5
    batch = prepared(new_family, "left")
    name = f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"
    tokens, cache = vlm.generate(batch, n, eos_token_id=NEVER, return_cache=True, names_filter=name)
    inputs = dict(batch.inputs)
    new = tokens[:, :-1]
    for key, extra in (("input_ids", new), ("attention_mask", torch.ones_like(new))):
        inputs[key] = torch.cat([inputs[key], extra], dim=1)
    inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(new)], dim=1)
    whole = vlm.to_batch(inputs)
    _, expected = vlm.run_with_cache(whole, names_filter=name)
    real = whole.attention_mask.bool()
    assert max_diff(cache[name], expected[name], real) <= TOL
    inputs["token_type_ids"] = torch.zeros_like(inputs["token_type_ids"])  # new tokens as prefix
    _, prefix = vlm.run_with_cache(vlm.to_batch(inputs), names_filter=name)
    assert max_diff(cache[name], prefix[name], real) > 1e-3


@PALIGEMMAS
def test_a_prompt_without_an_image_is_refused_in_one_line(new_family):
    from hooked_vllm import ImageCountError

    vlm = new_family.vlm
    with pytest.raises(ImageCountError, match="needs at least one image for every prompt"):
        vlm.prepare([[], family_images()[0]], ["Just text.", "Describe the image."])
