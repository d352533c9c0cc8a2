"""Gemma 3n: what only this family has (the shared bar, tests/test_families.py and
tests/test_family_lenses.py, runs on ``gemma3n`` as on every family).

- image positions: 16 soft tokens per image, row-major; ``<start_of_image>``, ``<end_of_image>`` and
  the blank lines around them are structure;
- token embeddings: ids of the vision and audio ranges are embedded by those embedders, as HF's outer
  forward does (``hook_embed`` is HF's ``inputs_embeds`` bit for bit, ``<end_of_image>`` included);
- AltUp: ``blocks.{l}.hook_in``/``hook_out`` are HF's four streams, an edit of the streams is the same
  edit inside HF, and HF's readout (streams 1-3 projected back, rescaled, averaged) is what the logits
  read, not the active stream; the logit lens decodes that readout at every layer;
- per-layer inputs: an edit of ``blocks.{l}.hook_per_layer_input`` is the same edit inside HF;
- attention: ``hook_pattern`` edits take effect (a head's pattern zeroed == HF with that head's
  ``o_proj`` columns zeroed); a KV-shared layer's pattern is its queries against its source layer's keys;
- without timm, a one-line refusal naming ``pip install "hooked-vllm[timm]"``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.adapters.gemma3n import altup_readout
from hooked_vllm.analysis import LogitLens, collect, lens_stack_from_cache, resid_stack_from_cache
from hooked_vllm.tiny_models.gemma3n import tiny_gemma3n
from tests.conftest import Family, family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
TOL = 1e-5


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory) -> Family:
    return Family("gemma3n", tmp_path_factory.mktemp("gemma3n"))


def text_model(family):
    return family.reference.model.language_model


def hf_run(family, batch, pre_hooks=None, hooks=None):
    """HF's logits on ``batch``, with forward pre-hooks / hooks ``{module: fn}`` on its modules, and
    every decoder layer's input and output stack."""
    stacks, handles = [], []

    def record(module, args, output):
        stacks.append((args[0], output))

    layers = text_model(family).layers
    handles += [layer.register_forward_hook(record) for layer in layers]
    handles += [m.register_forward_pre_hook(fn, with_kwargs=True) for m, fn in (pre_hooks or {}).items()]
    handles += [m.register_forward_hook(fn) for m, fn in (hooks or {}).items()]
    try:
        logits = family.reference(**hf_forward_inputs(family, batch)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, stacks


def real_max(a, b, batch):
    return (a - b)[batch.attention_mask.bool()].abs().max().item()


# ---------------------------------------------------------------- image positions and embeddings
@SIDES
def test_image_mask_is_the_soft_tokens(gemma3n, padding_side):
    vlm, config = gemma3n.vlm, gemma3n.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids = batch.input_ids
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    assert batch.image_mask.sum(-1).tolist() == [config.vision_soft_tokens_per_image] * 3
    for (slots,) in batch.image_slots:
        assert torch.equal(slots.patch_index()[0], torch.arange(16).view(4, 4))
    blank = vlm.tokenizer("\n\n", add_special_tokens=False).input_ids
    for i, ((start, end),) in enumerate(batch.ranges("image")):
        assert ids[i, start - 1] == config.boi_token_id and ids[i, end] == config.eoi_token_id
        assert ids[i, start - 1 - len(blank) : start - 1].tolist() == blank
        assert ids[i, end + 1 : end + 1 + len(blank)].tolist() == blank
        structure = list(range(start - 1 - len(blank), start)) + list(range(end, end + 1 + len(blank)))
        assert batch.special_mask[i, structure].all()


@SIDES
def test_hook_embed_is_hfs_inputs_embeds_vision_range_included(gemma3n, padding_side):
    """``<end_of_image>`` lies in the vision range: HF embeds it with ``embed_vision``, not the text
    table; the per-layer inputs read row 0 of their table for it and the soft tokens."""
    vlm, config = gemma3n.vlm, gemma3n.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    seen = {}

    def capture(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], per_layer=kwargs["per_layer_inputs"])

    hf_run(gemma3n, batch, pre_hooks={text_model(gemma3n): capture})
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n == "hook_embed" or "per_layer" in n)
    real = batch.attention_mask.bool()
    assert torch.equal(cache["hook_embed"][real], seen["embeds"][real])
    eoi = batch.input_ids == config.eoi_token_id
    assert eoi.sum() == 3 and config.eoi_token_id >= config.vision_config.vocab_offset
    text_row = (
        text_model(gemma3n).embed_tokens.weight[config.eoi_token_id] * config.text_config.hidden_size**0.5
    )
    assert (cache["hook_embed"][eoi] - text_row).abs().amax() > 0.1  # not the text table's row
    per_layer = text_model(gemma3n).project_per_layer_inputs(seen["embeds"], seen["per_layer"])
    for layer in range(vlm.cfg.n_layers):
        hooked = cache[f"blocks.{layer}.hook_per_layer_input"]
        assert real_max(hooked, per_layer[:, :, layer], batch) <= TOL


# ---------------------------------------------------------------- AltUp's four streams
@SIDES
def test_streams_are_hfs_and_the_logits_read_their_average(gemma3n, padding_side):
    vlm = gemma3n.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    hf_logits, stacks = hf_run(gemma3n, batch)
    logits, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith(("hook_in", "hook_out")))
    real = batch.attention_mask.bool()
    for layer, (hf_in, hf_out) in enumerate(stacks):
        for name, hf in (("hook_in", hf_in), ("hook_out", hf_out)):
            ours = cache[f"blocks.{layer}.{name}"]
            assert ours.shape == hf.shape == (4, *batch.input_ids.shape, vlm.cfg.d_model)
            assert (ours - hf)[:, real].abs().max() <= TOL, (layer, name)
    # HF's readout of the last stack, through the final norm and head: the logits
    final = cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_out"]
    readout = altup_readout(text_model(gemma3n), final)
    assert real_max(cache["ln_final.hook_in"], readout, batch) <= TOL
    cap = vlm.adapter.text_config.final_logit_softcapping
    decoded = torch.tanh(vlm.unembed(vlm.ln_final(readout)) / cap) * cap
    assert real_max(decoded, logits, batch) <= TOL and real_max(logits, hf_logits, batch) <= TOL
    # ... and the active stream alone is not what the model reads
    active = torch.tanh(vlm.unembed(vlm.ln_final(final[0])) / cap) * cap
    assert real_max(active, logits, batch) > 0.1


@SIDES
def test_editing_the_streams_is_the_same_edit_inside_hf(gemma3n, padding_side):
    """Streams 1-3 zeroed at the image positions after layer 1 (the active stream kept)."""
    vlm = gemma3n.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    image = batch.image_mask

    def edit(stack, hook=None):
        stack = stack.clone()
        stack[1:] = stack[1:].masked_fill(image[..., None].to(stack.device), 0.0)
        return stack

    ours = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_out", edit)])
    theirs, _ = hf_run(gemma3n, batch, hooks={text_model(gemma3n).layers[1]: lambda m, a, out: edit(out)})
    assert real_max(ours, theirs, batch) <= TOL
    assert real_max(ours, vlm(batch), batch) > 1e-3


def naive_readout(family, stack):
    """HF's end of ``Gemma3nTextModel.forward`` written out: streams 1-3 through the unembedding
    projections, each rescaled to stream 0's RMS, the four averaged."""
    model = text_model(family)
    rms = stack[0].pow(2).mean(-1, keepdim=True).sqrt()
    parts = [stack[0]]
    for i, projection in enumerate(model.altup_unembed_projections, start=1):
        projected = stack[i] @ projection.weight.T
        parts.append(projected * rms / projected.pow(2).mean(-1, keepdim=True).clamp(min=1e-5).sqrt())
    return sum(parts) / len(parts)


@SIDES
def test_the_logit_lens_reads_hfs_readout_of_the_four_streams(gemma3n, padding_side):
    """Every layer's lens decodes HF's readout of that layer's four streams (at the last layer: the
    model's logits); the lens of the active stream alone is refused."""
    vlm = gemma3n.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    lens = LogitLens.from_vlm(vlm)
    assert lens.hook_names == ("blocks.0.hook_in", *(f"blocks.{n}.hook_out" for n in range(vlm.cfg.n_layers)))
    hf_logits, stacks = hf_run(gemma3n, batch)
    logits, cache = vlm.run_with_cache(batch)
    positions = torch.stack([batch.last_positions, batch.last_positions - 1], dim=1)
    stack = lens_stack_from_cache(lens, cache, positions)
    hf_stacks = [stacks[0][0]] + [out for _, out in stacks]
    rows = torch.arange(len(batch))[:, None]
    for layer, hf_stack in enumerate(hf_stacks):
        expected = naive_readout(gemma3n, hf_stack)[rows, positions]
        assert (stack[layer] - expected).abs().max() <= TOL, layer
    final = lens.logits(stack[-1])
    assert (final - hf_logits[rows, positions]).abs().max() <= TOL
    streamed = collect(vlm, batch, lens_positions=positions, verbalize_images=True)
    assert torch.equal(streamed.lens.final_token, hf_logits[rows, positions].argmax(-1))
    assert streamed.lens.kl_to_final[-1].abs().max() <= 1e-6
    summarized = lens.summarize(stack)
    assert torch.allclose(streamed.lens.final_prob, summarized.final_prob, atol=1e-6)
    with pytest.raises(ValueError, match="lens_stack_from_cache"):
        resid_stack_from_cache(cache, positions)
    with pytest.raises(NotImplementedError, match="lens_stack_from_cache"):
        cache.accumulated_resid(apply_ln=True)
    assert torch.equal(cache.accumulated_resid()[-1], cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"])
    with pytest.raises(ValueError, match="resid_post"):
        lens.lens_input(cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"])


# ---------------------------------------------------------------- per-layer inputs and attention
@SIDES
def test_per_layer_input_edit_is_the_same_edit_inside_hf(gemma3n, padding_side):
    vlm = gemma3n.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)

    def zero_at_images(x, hook=None):
        return x.masked_fill(batch.image_mask[..., None].to(x.device), 0.0)

    def hf_edit(module, args, kwargs):
        return (args[0], args[1], zero_at_images(args[2]), *args[3:]), kwargs

    ours = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.2.hook_per_layer_input", zero_at_images)])
    theirs, _ = hf_run(gemma3n, batch, pre_hooks={text_model(gemma3n).layers[2]: hf_edit})
    assert real_max(ours, theirs, batch) <= TOL
    assert real_max(ours, vlm(batch), batch) > 1e-3


@SIDES
def test_a_zeroed_head_pattern_is_hf_without_that_head(gemma3n, padding_side):
    """hook_pattern is live: head 1 of layer 3 (a KV-shared layer) zeroed == HF with the o_proj input
    columns of head 1 zeroed."""
    vlm = gemma3n.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    d_head = vlm.adapter.text_config.head_dim

    def zero_head(pattern, hook=None):
        pattern = pattern.clone()
        pattern[:, 1] = 0
        return pattern

    def hf_zero_head(module, args, kwargs):
        x = args[0].clone()
        x[..., d_head : 2 * d_head] = 0
        return (x, *args[1:]), kwargs

    o_proj = text_model(gemma3n).layers[3].self_attn.o_proj
    ours = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.3.attn.hook_pattern", zero_head)])
    theirs, _ = hf_run(gemma3n, batch, pre_hooks={o_proj: hf_zero_head})
    assert real_max(ours, theirs, batch) <= TOL
    assert real_max(ours, vlm(batch), batch) > 1e-3


def test_kv_shared_layers_attend_with_their_source_layers_keys(gemma3n):
    """Layers 3 and 4 compute no keys or values: their patterns are their rotated queries against the
    rotated keys of layers 1 and 2 (unscaled, masked, softmaxed), and they weigh those layers' values."""
    vlm = gemma3n.vlm
    assert vlm.adapter.text_config.kv_sharing_modes == [None, "store", "store", "reuse", "reuse"]
    assert vlm.adapter.value_hooks() == {
        layer: f"blocks.{source}.attn.v_norm.hook_out" for layer, source in enumerate([0, 1, 2, 1, 2])
    }
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    _, cache = vlm.run_with_cache(batch)
    real = batch.attention_mask.bool()
    for layer, source in ((3, 1), (4, 2)):
        assert f"blocks.{layer}.attn.hook_rot_k" not in cache
        q = cache[f"blocks.{layer}.attn.hook_rot_q"].transpose(1, 2)  # TL's [batch, pos, head, d_head]
        k = cache[f"blocks.{source}.attn.hook_rot_k"].transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2)
        n = scores.shape[-1]
        allowed = torch.ones(n, n, dtype=torch.bool).tril() & real[:, None, None, :]
        kind = vlm.adapter.text_config.layer_types[layer]
        if kind == "sliding_attention":
            window = vlm.adapter.text_config.sliding_window
            allowed &= torch.ones(n, n, dtype=torch.bool).triu(-(window - 1))
        expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        pattern = cache["pattern", layer]
        pair = real[:, None, :, None] & real[:, None, None, :]
        assert (pattern - expected).abs().masked_fill(~pair, 0).max() <= TOL, layer


# ---------------------------------------------------------------- timm missing
def test_without_timm_the_model_is_refused_in_one_line(gemma3n, monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a)
    )
    for build in (
        lambda: HookedVLM.from_hf(gemma3n.reference, gemma3n.processor),
        lambda: tiny_gemma3n(directory=tmp_path),
    ):
        with pytest.raises(UnsupportedModelError) as error:
            build()
        message = str(error.value)
        assert "\n" not in message and 'pip install "hooked-vllm[timm]"' in message
