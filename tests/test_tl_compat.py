"""TransformerLens users' own code runs unchanged: text entry points, TL's patching module and
test_prompt, exact residual decompositions and logit attribution at image positions, weight
processing, and caches and hooks during generation."""

from __future__ import annotations

import re

import pytest
import torch
from transformer_lens import patching
from transformer_lens import utilities as utils

from hooked_vllm import HookedVLM, MissingImageError
from hooked_vllm.demo import MODEL_DIR, shapes
from hooked_vllm.model.batch import positions_from_mask
from hooked_vllm.testing import tiny_instructblip, tiny_llava
from tests.conftest import INSTRUCTIONS, random_images


@pytest.fixture(scope="module")
def demo() -> HookedVLM:
    """The trained demo model: its norm weights are not ones, so an unfolded weight shows."""
    return HookedVLM.from_pretrained(str(MODEL_DIR))


def demo_batch(vlm, n=2, seed=5, padding_side="left"):
    examples = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + seed, n=n)
    return vlm.prepare([e.image for e in examples], [e.question for e in examples], padding_side=padding_side)


def hf_text_logits(family, input_ids, attention_mask):
    """HF's own language model on text alone."""
    lm = family.reference if family.name == "llava" else family.reference.language_model
    return lm(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_from_mask(attention_mask)
    ).logits


# ---------------------------------------------------------------- entry points
def test_strings_and_tokens_run_the_language_model_as_hf_does(family):
    vlm = family.vlm
    prompts = ["a red circle", "what colour is the big square in the picture"]
    tokens = vlm.to_tokens(prompts)
    mask = utils.get_attention_mask(vlm.bridge.tokenizer, tokens, vlm.cfg.default_prepend_bos)
    assert mask.min() == 0, "the two prompts must pad"
    expected = hf_text_logits(family, tokens, mask)
    real = mask.bool()
    assert (vlm(prompts) - expected)[real].abs().max() <= 1e-5
    one = vlm.to_tokens(prompts[1])
    assert (vlm(prompts[1]) - hf_text_logits(family, one, torch.ones_like(one))).abs().max() <= 1e-5
    assert torch.equal(vlm(one), vlm(prompts[1]))
    assert torch.equal(vlm(one[0]), vlm(one))  # a [pos] tensor is one item
    logits, cache = vlm.run_with_cache(one, names_filter="blocks.0.hook_resid_post")
    assert torch.equal(logits, vlm(one)) and cache["resid_post", 0].shape[:2] == one.shape
    no_bos = vlm.to_tokens(prompts[1], prepend_bos=False)
    assert no_bos.shape[1] == one.shape[1] - 1 and torch.equal(no_bos[0], one[0, 1:])
    generated = vlm.generate(prompts[1], max_new_tokens=3, eos_token_id=-1, return_type="tokens")
    assert torch.equal(generated, vlm.generate(one, max_new_tokens=3, eos_token_id=-1))


def test_text_tokens_read_with_their_leading_spaces(family):
    vlm = family.vlm
    text = "what colour is the circle"
    str_tokens = vlm.to_str_tokens(text, prepend_bos=False)
    assert "".join(str_tokens) == vlm.to_string(vlm.to_tokens(text, prepend_bos=False)[0])
    assert " is" in str_tokens and "is" not in str_tokens
    assert vlm.to_str_tokens([text, "a square"], prepend_bos=False)[0] == str_tokens
    position = vlm.get_token_position(" is", text, prepend_bos=False)
    assert str_tokens[position] == " is"
    assert vlm.to_single_token(" is") == int(vlm.to_tokens(text, prepend_bos=False)[0, position])


def test_an_image_placeholder_in_text_is_refused(family):
    vlm = family.vlm
    placeholder = vlm.tokenizer.convert_ids_to_tokens(vlm.adapter.image_token_id)
    for call in (vlm.to_tokens, vlm, vlm.to_str_tokens):
        with pytest.raises(MissingImageError, match="no image was given"):
            call(f"{placeholder} describe it")


def test_transformer_lens_test_prompt_prints_the_true_rank(demo, capsys):
    prompt, answer = "what colour is the", " circle"
    utils.test_prompt(prompt, answer, demo)
    printed = capsys.readouterr().out
    rank = int(re.search(r"Rank: (\d+)", printed).group(1))
    tokens = demo.to_tokens(prompt)
    logits = demo(tokens)[0, -1]
    expected = int((logits > logits[demo.to_single_token(answer)]).sum())
    assert rank == expected


# ---------------------------------------------------------------- transformer_lens.patching
def test_transformer_lens_patching_equals_hand_written_patches(demo):
    clean = demo_batch(demo, n=1, seed=5)
    corrupted = demo_batch(demo, n=1, seed=6)
    corrupted = demo.prepare(
        [shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + 6, n=1)[0].image], clean.instructions
    )
    _, clean_cache = demo.run_with_cache(clean)
    answer = int(demo(clean)[0, -1].argmax())

    def metric(logits):
        return logits[0, -1, answer]

    resid = patching.get_act_patch_resid_pre(demo, corrupted, clean_cache, metric)
    heads = patching.get_act_patch_attn_head_out_all_pos(demo, corrupted, clean_cache, metric)
    assert resid.shape == (demo.cfg.n_layers, corrupted.shape[1])
    image_pos = int(torch.nonzero(corrupted.image_mask[0])[3])
    for layer, pos in [(0, image_pos), (2, image_pos), (3, corrupted.shape[1] - 1), (5, 1)]:

        def patch(act, hook, pos=pos, layer=layer):
            act = act.clone()
            act[:, pos] = clean_cache["resid_pre", layer][:, pos]
            return act

        by_hand = metric(
            demo.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)])
        )
        assert resid[layer, pos] == pytest.approx(float(by_hand), abs=1e-5)
    for layer, head in [(1, 0), (4, 3)]:

        def patch_head(z, hook, layer=layer, head=head):
            z = z.clone()
            z[:, :, head] = clean_cache["z", layer][:, :, head]
            return z

        by_hand = metric(
            demo.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch_head)])
        )
        assert heads[layer, head] == pytest.approx(float(by_hand), abs=1e-5)
    assert resid[:, image_pos].abs().sum() > 0, "patching an image position must matter somewhere"


# ---------------------------------------------------------------- exact decompositions
def test_decompositions_sum_to_the_residual_at_every_position(demo):
    batch = demo_batch(demo, n=2, padding_side="right")
    demo.bridge.set_use_attn_result(True)
    try:
        _, cache = demo.run_with_cache(batch)
    finally:
        demo.bridge.set_use_attn_result(False)
    final = cache[f"blocks.{demo.cfg.n_layers - 1}.hook_resid_post"]
    real = batch.attention_mask.bool()
    for where in (batch.image_mask, batch.text_mask & real, batch.special_mask & real):
        assert where.any()
        target = final[where]
        torch.testing.assert_close(cache.decompose_resid().sum(0)[where], target, rtol=1e-5, atol=1e-5)
        full = cache.get_full_resid_decomposition(expand_neurons=False).sum(0)[where]
        torch.testing.assert_close(full, target, rtol=1e-5, atol=1e-5)
    heads = cache.stack_head_results(layer=1)  # layer 0's heads
    attn_out = cache["blocks.0.hook_attn_out"]
    torch.testing.assert_close(heads.sum(0), attn_out, rtol=1e-5, atol=1e-5)  # LLaMA: no b_O
    # hook_embed is the visual prefix at image positions: the stream's start
    assert torch.equal(cache["hook_embed"][batch.image_mask], cache["hook_visual_prefix"])


@pytest.mark.parametrize("processed", [False, True])
def test_logit_attrs_sum_to_the_logit_difference(processed):
    vlm = HookedVLM.from_pretrained(str(MODEL_DIR))
    if processed:
        vlm.enable_compatibility_mode(disable_warnings=True)
    batch = demo_batch(vlm, n=2, padding_side="left")
    logits, cache = vlm.run_with_cache(batch)
    right, wrong = vlm.to_single_token("circle"), vlm.to_single_token("square")
    both = dict(tokens=torch.tensor([right, right]), incorrect_tokens=torch.tensor([wrong, wrong]))
    image_position = int(torch.nonzero(batch.image_mask[0])[5])
    assert batch.image_mask[:, image_position].all()
    for position in (-1, image_position):  # the answer, and direct logit attribution on an image token
        stack = cache.decompose_resid(layer=-1)[:, :, position]
        attrs = cache.logit_attrs(stack, **both, pos_slice=position)
        difference = logits[:, position, right] - logits[:, position, wrong]
        torch.testing.assert_close(attrs.sum(0), difference, rtol=1e-5, atol=1e-5)
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1) @ vlm.W_U
    torch.testing.assert_close(lens[-1], logits[:, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- weight processing
def _with_random_norm_weights(hf_model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in hf_model.named_parameters():
        if "norm" in name and parameter.dim() == 1 and "language_model" in name:
            parameter.data = 0.5 + torch.rand(parameter.shape, generator=generator)
    return hf_model


@pytest.mark.parametrize("builder", [tiny_llava, tiny_instructblip], ids=["llava", "instructblip"])
def test_processed_weights_keep_the_log_probs(builder, tmp_path):
    hf_model, processor = builder(seed=0, directory=tmp_path)
    vlm = HookedVLM.from_hf(_with_random_norm_weights(hf_model), processor)
    batch = vlm.prepare(random_images(3), INSTRUCTIONS, padding_side="right")
    real = batch.attention_mask.bool()
    before = vlm(batch).log_softmax(-1)[real]
    vlm.enable_compatibility_mode(disable_warnings=True)
    after = vlm(batch).log_softmax(-1)[real]
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.allclose(vlm.ln_final.w, torch.ones_like(vlm.ln_final.w)), "fold_ln folds the final norm"


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_the_generation_cache_equals_a_forward_over_the_generated_sequence(family, padding_side):
    vlm = family.vlm
    batch = vlm.prepare(random_images(3), INSTRUCTIONS, padding_side=padding_side)
    tokens, generated = vlm.generate(batch, max_new_tokens=5, eos_token_id=-1, return_cache=True)
    mask = torch.cat([batch.attention_mask, torch.ones_like(tokens[:, :-1])], dim=1)
    ids = torch.cat([batch.input_ids, tokens[:, :-1]], dim=1)
    _, forward = vlm.run_with_cache(vlm.to_batch({**batch.inputs, "input_ids": ids, "attention_mask": mask}))
    real = mask.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]
    assert set(generated.keys()) == set(forward.keys())
    for name in forward.keys():
        ours, theirs = generated[name], forward[name]
        assert ours.shape == theirs.shape, name
        if not ours.is_floating_point():
            assert torch.equal(ours, theirs), name
        elif name.endswith(("hook_pattern", "hook_attn_scores")):
            assert (ours - theirs).abs().masked_fill(~pairs, 0).max() <= 1e-5, name
        elif ours.shape[:2] == real.shape:
            assert (ours - theirs)[real].abs().max() <= 1e-5, name
        else:  # the vision side and the visual prefix: computed once, from the prompt
            assert torch.equal(ours, theirs), name


def test_hooks_act_on_every_generated_step_as_the_same_intervention_in_hf(family):
    """MLP outputs scaled 8x in every layer, by hook here and by a forward hook on HF's modules."""
    vlm, reference = family.vlm, family.reference
    batch = vlm.prepare(random_images(3), INSTRUCTIONS)
    layers = range(vlm.cfg.n_layers)
    ablate = [(f"blocks.{layer}.hook_mlp_out", lambda out, hook: 8 * out) for layer in layers]
    with vlm.hooks(fwd_hooks=ablate):
        ours = vlm.generate(batch, max_new_tokens=12, eos_token_id=-1)
    decoder = reference.model.language_model if family.name == "llava" else reference.language_model.model
    handles = [
        decoder.layers[layer].mlp.register_forward_hook(lambda module, args, out: 8 * out) for layer in layers
    ]
    try:
        theirs = reference.generate(**batch.inputs, max_new_tokens=12, do_sample=False, eos_token_id=-1)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(ours, theirs[:, batch.input_ids.shape[1] :])
    assert not torch.equal(ours, vlm.generate(batch, max_new_tokens=12, eos_token_id=-1)), (
        "the intervention must change the tokens"
    )
