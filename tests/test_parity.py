"""HookedVLM against Hugging Face, layer by layer, float32, eager attention (both families).

The tiny text backbones use grouped-query attention (4 query heads, 2 key/value heads). HF is given
the same explicit ``position_ids`` (from the attention mask), as its ``generate`` derives them.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import INSTRUCTIONS, random_images

TOL = 1e-5


def decoder_layers(family):
    ref = family.reference
    return ref.model.language_model.layers if family.name == "llava" else ref.language_model.model.layers


def hf_run(family, batch):
    """HF logits, per-layer residual stream (pre final norm) and attention patterns."""
    residuals = []

    def record(module, args, output):
        residuals.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(record) for layer in decoder_layers(family)]
    try:
        out = family.reference(
            **batch.inputs, position_ids=batch.position_ids, output_attentions=True, output_hidden_states=True
        )
    finally:
        for handle in handles:
            handle.remove()
    lm_out = getattr(out, "language_model_outputs", None) or out  # InstructBLIP nests them
    return SimpleNamespace(
        logits=out.logits, hidden_states=lm_out.hidden_states, attentions=lm_out.attentions
    ), residuals


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_layer_by_layer_parity_with_hf(family, images, padding_side):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    logits, cache = vlm.run_with_cache(batch)
    out, residuals = hf_run(family, batch)
    real = batch.attention_mask.bool()

    assert (logits - out.logits)[real].abs().max() <= TOL
    token_embeds = family.reference.get_input_embeddings()(batch.input_ids)
    text = ~batch.image_mask
    assert torch.equal(cache["hook_embed"][text], token_embeds[text])
    # hook_embed is where the stream starts: the visual prefix at image positions
    assert torch.equal(cache["hook_embed"][batch.image_mask], cache["hook_visual_prefix"])
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    assert (cache["blocks.0.hook_resid_pre"] - out.hidden_states[0])[real].abs().max() <= TOL
    for layer in range(vlm.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"]
        assert (resid - residuals[layer])[real].abs().max() <= TOL, f"resid_post layer {layer}"
        if layer < vlm.cfg.n_layers - 1:  # HF's last hidden state is after the final norm
            assert (resid - out.hidden_states[layer + 1])[real].abs().max() <= TOL
        pattern, hf_pattern = cache[f"blocks.{layer}.attn.hook_pattern"], out.attentions[layer]
        pair = real[:, None, :, None] & real[:, None, None, :]
        diff = (pattern - hf_pattern).abs().masked_fill(~pair, 0)
        assert diff.max() <= TOL, f"pattern layer {layer}"


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_item_alone_equals_its_batched_self(family, images, padding_side):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side=padding_side)
    batched = vlm(batch)
    for i in range(len(batch)):
        alone = vlm(vlm.prepare(images[i : i + 1], INSTRUCTIONS[i : i + 1]))[0]
        mine = batched[i][batch.attention_mask[i].bool()]
        assert (mine - alone).abs().max() <= TOL


def test_greedy_generate_matches_hf(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    ours = vlm.generate(batch, max_new_tokens=6)
    theirs = family.reference.generate(**batch.inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs[:, batch.input_ids.shape[1] :][:, : ours.shape[1]])


def test_generate_is_independent_of_padding_side(family, images):
    vlm = family.vlm
    left = vlm.generate(vlm.prepare(images, INSTRUCTIONS, padding_side="left"), max_new_tokens=4)
    right = vlm.generate(vlm.prepare(images, INSTRUCTIONS, padding_side="right"), max_new_tokens=4)
    assert torch.equal(left, right)


def test_modality_masks(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS, padding_side="right")
    image_token = vlm.adapter.image_token_id
    real = batch.attention_mask.bool()
    assert torch.equal(batch.image_mask, (batch.input_ids == image_token) & real)
    assert not (batch.image_mask & batch.text_mask).any()
    assert torch.equal(batch.special_mask, ~(batch.image_mask | batch.text_mask))
    n_image_tokens = family.reference.config.num_query_tokens if family.name == "instructblip" else 25
    for i, instruction in enumerate(INSTRUCTIONS):
        decoded = vlm.tokenizer.decode(batch.input_ids[i][batch.text_mask[i]])
        assert decoded.strip() == instruction
        ((start, end),) = batch.ranges("image")[i]
        assert end - start == n_image_tokens
        assert batch.last_positions[i] == real[i].nonzero().max()


def test_raw_processor_output_is_accepted(family, images):
    vlm = family.vlm
    prompts = [vlm.adapter.format_prompt(p, 1)[0] for p in INSTRUCTIONS]
    raw = family.processor(images=images, text=prompts, return_tensors="pt", padding=True)
    prepared = vlm.prepare(images, INSTRUCTIONS)
    assert (vlm(raw) - vlm(prepared)).abs().max() <= TOL
    batch = vlm.to_batch(raw)
    assert torch.equal(batch.image_mask, prepared.image_mask)
    assert not batch.exact_text_spans
    # Inferred text covers the instruction and more (template words), never image or padding.
    assert (batch.text_mask | ~prepared.text_mask).all()


def test_visual_prefix_hook_reads_and_ablates(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    _, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
    prefix = cache["hook_visual_prefix"]
    embeds = vlm.embed(batch)
    assert torch.equal(embeds[batch.image_mask], prefix.reshape(-1, prefix.shape[-1]))

    ablated = vlm.run_with_hooks(
        batch, fwd_hooks=[("hook_visual_prefix", lambda x, hook: torch.zeros_like(x))]
    )
    zeroed = embeds.masked_fill(batch.image_mask[..., None], 0.0)
    # LLaVA's forward runs the language model alone when given embeddings and no pixels.
    lm = family.reference.language_model if family.name == "instructblip" else family.reference
    hf_logits = lm(
        inputs_embeds=zeroed, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    real = batch.attention_mask.bool()
    assert (ablated - hf_logits)[real].abs().max() <= TOL


def test_vision_tower_hooks_reach_the_prefix(llava, images):
    """vision_feature_layer=-2: the last CLIP layer must not affect the prefix, the first must."""
    vlm = llava.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)

    def prefix_with(hook_name):
        hooks = [(hook_name, lambda x, hook: x * 0.0)] if hook_name else []
        with vlm.hooks(fwd_hooks=hooks):
            _, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
        return cache["hook_visual_prefix"]

    clean = prefix_with(None)
    assert torch.equal(prefix_with("vision.blocks.1.hook_resid_post"), clean)
    assert (prefix_with("vision.blocks.0.hook_resid_post") - clean).abs().max() > 1e-3


def test_transformerlens_idioms(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images, INSTRUCTIONS)
    logits, cache = vlm.run_with_cache(batch)
    # Logit lens: the last accumulated residual, normed and unembedded, is the logits.
    accumulated = cache.accumulated_resid(apply_ln=True)
    lens = accumulated[-1] @ vlm.W_U
    assert (lens - logits).abs().max() <= 1e-4
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])

    # Patching with functools.partial and a name-filter predicate.
    def scale(x, hook, factor):
        return x * factor

    with_hooks = vlm.run_with_hooks(
        batch, fwd_hooks=[(lambda name: name.endswith("hook_attn_out"), functools.partial(scale, factor=1.0))]
    )
    assert torch.equal(with_hooks, logits)
    changed = vlm.run_with_hooks(
        batch, fwd_hooks=[("blocks.0.hook_mlp_out", functools.partial(scale, factor=0.0))]
    )
    assert (changed - logits).abs().max() > 1e-3
    # Per-head weights as TransformerLens gives them: value weights per key/value head under GQA.
    assert vlm.W_O.shape[:2] == (vlm.cfg.n_layers, vlm.cfg.n_heads)
    assert vlm.W_V.shape[:2] == (vlm.cfg.n_layers, vlm.cfg.n_key_value_heads)
    assert torch.equal(vlm(batch), logits), "hooks must be gone after run_with_hooks"


def test_hooks_are_removed_after_an_exception(family, images):
    vlm = family.vlm
    batch = vlm.prepare(images[:1], INSTRUCTIONS[:1])
    clean = vlm(batch)

    def boom(x, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        vlm.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_post", boom)])
    with pytest.raises(RuntimeError, match="inside"):
        with vlm.hooks(fwd_hooks=[("hook_visual_prefix", lambda x, hook: x * 0)]):
            raise RuntimeError("inside the context")
    assert torch.equal(vlm(batch), clean)


def test_several_images_in_one_prompt(llava):
    vlm = llava.vlm
    pair = random_images(2, seed=3)
    batch = vlm.prepare([pair], ["Compare the two images."])
    assert [end - start for start, end in batch.ranges("image")[0]] == [25, 25]
    out = llava.reference(**batch.inputs, position_ids=batch.position_ids)
    assert (vlm(batch) - out.logits).abs().max() <= TOL
    assert vlm.to_str_tokens(batch).count("<img1:0>") == 1
