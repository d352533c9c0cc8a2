"""LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Gemma 3 against Hugging Face, float32, eager attention.

Every family runs the same 3-item batch: images of 48x24, 24x48 and 40x40 pixels (so tiles, grids
and image-token counts differ per item) and prompts of 3 lengths, padded left and right. The
reference is the untouched HF model, called as HF's own ``forward``/``generate`` is called
(:func:`tests.conftest.hf_forward_inputs`): Qwen derives its M-RoPE positions itself, Gemma 3 builds
its bidirectional image blocks from ``token_type_ids``. Differences are measured on real positions
only (real query rows and real key columns for attention patterns).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MllamaConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from hooked_vllm import BatchFormatError, HookedVLM, UnsupportedModelError
from hooked_vllm.adapters import adapter_class_for, supported_architectures
from hooked_vllm.errors import GenerationArgumentError
from tests.conftest import cli, family_images, hf_forward_inputs, hf_lm_outputs, hf_text_parts, make_coco

TOL = 1e-5
PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
NEVER = -1  # an eos id no token has: every item generates all its tokens, in HF and here
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])


def prepared(family, padding_side="left"):
    batch = family.vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    assert batch.attention_mask.min() == 0, "the batch must contain padding"
    return batch


def max_diff(a, b, where):
    """Largest |a - b| over the positions ``where`` (``[batch, pos]``), shapes checked first."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[where].abs().max().item()


def hf_layers(family):
    return hf_text_parts(family.reference)[0].layers


def layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def active_stream(family, hidden):
    """The stream ``hook_resid_pre``/``hook_resid_post`` hold: HF's hidden state itself, or of Gemma 3n's
    AltUp stack (``[streams, batch, pos, d_model]``) the active stream."""
    config = family.reference.config.get_text_config()
    return hidden[config.altup_active_idx] if getattr(config, "altup_num_inputs", None) else hidden


def hf_run(family, batch, **kwargs):
    """The HF model's output on ``batch`` and each decoder layer's output (its residual stream)."""
    residuals = []

    def record(module, args, output):
        residuals.append(layer_output(output))

    handles = [layer.register_forward_hook(record) for layer in hf_layers(family)]
    try:
        out = family.reference(**hf_inputs(family, batch), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return out, residuals


def hf_inputs(family, batch):
    """What HF's forward is called with (:func:`tests.conftest.hf_forward_inputs`); never our
    positions for Qwen, so that HF derives its M-RoPE positions itself even if ours were 2-D."""
    inputs = hf_forward_inputs(family, batch)
    if family.name.startswith("qwen"):
        inputs.pop("position_ids", None)
    return inputs


def most_padded(batch):
    return int(batch.attention_mask.sum(-1).argmin())


# ---------------------------------------------------------------- 1. layer by layer
@SIDES
def test_layer_by_layer_parity_with_hf(new_family, padding_side):
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    logits, cache = vlm.run_with_cache(batch)
    out, residuals = hf_run(new_family, batch, output_attentions=True, output_hidden_states=True)
    real = batch.attention_mask.bool()

    assert max_diff(logits, out.logits, real) <= TOL
    out = hf_lm_outputs(out)
    # the stream starts from HF's input embeddings, visual prefix scattered in
    embedded = active_stream(new_family, out.hidden_states[0])
    assert max_diff(cache["blocks.0.hook_resid_pre"], embedded, real) <= TOL
    # HF returns the patterns of the layers that have one (Qwen3.5: not its linear-attention layers)
    attention_layers = vlm.adapter.attention_layers
    assert len(residuals) == vlm.cfg.n_layers and len(out.attentions) == len(attention_layers)
    pair = real[:, None, :, None] & real[:, None, None, :]
    for layer in range(vlm.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"]
        hf_resid = active_stream(new_family, residuals[layer])
        assert max_diff(resid, hf_resid, real) <= TOL, f"resid_post layer {layer}"
        if layer - 1 not in vlm.adapter.injection_layers:  # HF records DeepStack's before its addition
            hf_resid = active_stream(new_family, out.hidden_states[layer])
            assert max_diff(cache[f"blocks.{layer}.hook_resid_pre"], hf_resid, real) <= TOL
        assert (f"blocks.{layer}.attn.hook_pattern" in cache) == (layer in attention_layers)
    for layer, hf_pattern in zip(attention_layers, out.attentions, strict=True):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert pattern.shape == hf_pattern.shape
        diff = (pattern - hf_pattern).abs().masked_fill(~pair, 0)
        assert diff.max() <= TOL, f"pattern layer {layer}"


# ---------------------------------------------------------------- 2. alone == batched
@SIDES
def test_most_padded_item_alone_equals_its_batched_self(new_family, padding_side):
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    i = most_padded(batch)
    alone_batch = vlm.prepare(family_images()[i : i + 1], PROMPTS[i : i + 1], padding_side=padding_side)
    assert alone_batch.attention_mask.bool().all()
    alone = vlm(alone_batch)[0]
    real = batch.attention_mask[i].bool()
    mine = vlm(batch)[i][real]
    assert mine.shape == alone.shape
    assert (mine - alone).abs().max() <= TOL


# ---------------------------------------------------------------- 3. image positions
def llava_next_slot_counts(config, image_sizes):
    """Per image (patches, newline slots), from HF's anyres functions: the base tile plus the
    unpadded high-resolution canvas, one newline per canvas row."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    counts = []
    for size in image_sizes.tolist():
        tiles_h, tiles_w = get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size
        )
        canvas = unpad_image(torch.zeros(1, tiles_h * side, tiles_w * side), size)
        rows, cols = canvas.shape[1:]
        counts.append((side * side + rows * cols, rows))
    return counts


@SIDES
def test_image_mask_is_exactly_the_image_patch_positions(new_family, padding_side):
    vlm, config = new_family.vlm, new_family.reference.config
    batch = prepared(new_family, padding_side)
    _, cache = vlm.run_with_cache(batch, names_filter=["hook_embed", "hook_visual_prefix"])
    ids, real = batch.input_ids, batch.attention_mask.bool()
    placeholders = vlm.adapter.placeholder_mask(ids)
    embed = cache["hook_embed"]

    # The visual prefix is what sits at the placeholders, flat, in order (and no slot is all zero,
    # which would make every comparison at image positions pass trivially).
    assert cache["hook_visual_prefix"].dim() == 2
    assert (cache["hook_visual_prefix"].abs().amax(-1) > 0).all()
    prefix = cache["hook_visual_prefix"]
    if vlm.adapter.visual_prefix_added:  # Molmo 2: added to the placeholder tokens' own embeddings
        prefix = new_family.reference.get_input_embeddings()(ids[placeholders]) + prefix
    assert torch.equal(embed[placeholders], prefix)
    assert not (batch.image_mask & ~real).any()
    assert not (batch.image_mask & batch.text_mask).any()
    assert torch.equal(batch.special_mask, ~(batch.image_mask | batch.text_mask))
    per_item = batch.image_mask.sum(-1).tolist()
    assert per_item == [sum(int(s.is_patch.sum()) for s in item) for item in batch.image_slots]

    if new_family.name.startswith("qwen"):
        assert torch.equal(batch.image_mask, ids == config.image_token_id)
        assert torch.equal(batch.image_mask, batch.inputs["mm_token_type_ids"] == 1)
        merge = config.vision_config.spatial_merge_size
        assert per_item == (batch.inputs["image_grid_thw"].prod(-1) // merge**2).tolist()
        for token in (config.vision_start_token_id, config.vision_end_token_id):
            assert batch.special_mask[ids == token].all()
    elif new_family.name == "gemma3":
        assert torch.equal(batch.image_mask, ids == config.image_token_id)
        assert torch.equal(batch.image_mask, batch.inputs["token_type_ids"] == 1)
        assert per_item == [config.mm_tokens_per_image] * len(batch)
        for token in (config.boi_token_index, config.eoi_token_index):
            assert ((ids == token).sum(-1) == 1).all()
            assert batch.special_mask[ids == token].all()
        # the soft tokens are one block, between <start_of_image> and <end_of_image>
        for i, ((start, end),) in enumerate(batch.ranges("image")):
            assert ids[i, start - 1] == config.boi_token_index and ids[i, end] == config.eoi_token_index
    elif new_family.name == "llava_next":  # other families check theirs in tests/test_family_<name>.py
        assert torch.equal(placeholders, (ids == config.image_token_id) & real)
        counts = llava_next_slot_counts(config, batch.inputs["image_sizes"])
        assert per_item == [patches for patches, _ in counts]
        assert placeholders.sum(-1).tolist() == [patches + rows for patches, rows in counts]
        newline = new_family.reference.model.image_newline
        newline_slots = placeholders & ~batch.image_mask
        assert torch.equal(embed[newline_slots], newline.expand(int(newline_slots.sum()), -1))
        # ... and no patch position holds the newline vector
        assert not (embed[batch.image_mask] == newline).all(-1).any()
        assert batch.special_mask[newline_slots].all()


# ---------------------------------------------------------------- 4. ablations
def zeroed_features(method):
    """``get_image_features`` with every image's ``pooler_output`` zeroed (Llama 4, which has none,
    projects ``last_hidden_state``: that one)."""

    def wrapped(*args, **kwargs):
        out = method(*args, **kwargs)
        pooled = out.pooler_output
        if pooled is None:
            out.last_hidden_state = torch.zeros_like(out.last_hidden_state)
        elif isinstance(pooled, (list, tuple)):
            out.pooler_output = type(pooled)(torch.zeros_like(p) for p in pooled)
        else:
            out.pooler_output = torch.zeros_like(pooled)
        return out

    return wrapped


@SIDES
def test_visual_prefix_ablation_equals_hf_ablation(new_family, padding_side, monkeypatch):
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    real = batch.attention_mask.bool()
    clean = vlm(batch)
    zero = [("hook_visual_prefix", lambda x, hook: torch.zeros_like(x))]
    ours = vlm.run_with_hooks(batch, fwd_hooks=zero)
    inner = getattr(new_family.reference, "model", new_family.reference)  # BLIP-2: the outer model
    monkeypatch.setattr(inner, "get_image_features", zeroed_features(inner.get_image_features))
    theirs = new_family.reference(**hf_inputs(new_family, batch)).logits
    assert max_diff(ours, theirs, real) <= TOL
    assert max_diff(ours, clean, real) > 1e-3, "the ablation must change something"


@SIDES
def test_resid_ablation_at_image_positions_equals_hf(new_family, padding_side):
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    real, image = batch.attention_mask.bool(), batch.image_mask

    def ours_hook(x, hook):
        return x.masked_fill(image[..., None].to(x.device), 0.0)

    def hf_hook(module, args, output):
        hidden = layer_output(output).clone()
        stream = active_stream(new_family, hidden)  # Gemma 3n: its active AltUp stream only
        stream.masked_fill_(image[..., None], 0.0)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    ours = vlm.run_with_hooks(batch, fwd_hooks=[("blocks.1.hook_resid_post", ours_hook)])
    handle = hf_layers(new_family)[1].register_forward_hook(hf_hook)
    try:
        theirs = new_family.reference(**hf_inputs(new_family, batch)).logits
    finally:
        handle.remove()
    assert max_diff(ours, theirs, real) <= TOL
    assert max_diff(ours, vlm(batch), real) > 1e-3, "the ablation must change something"


# ---------------------------------------------------------------- 5. generation
def generate_with_step_logits(vlm, batch, n):
    """Greedy tokens ``[batch, n]`` and the logits each was picked from ``[batch, n, vocab]``."""
    tokens, cache = vlm.generate(
        batch, n, eos_token_id=NEVER, return_cache=True, names_filter="unembed.hook_out"
    )
    logits = cache["unembed.hook_out"]  # the prompt pass, then one position per decoding step
    cap = vlm.cfg.output_logits_soft_cap  # Gemma 2: the logits are soft-capped after the unembedding
    if cap > 0:
        logits = torch.tanh(logits / cap) * cap
    width = batch.input_ids.shape[1]
    first = logits[torch.arange(len(batch)), batch.last_positions]
    return tokens, torch.cat([first[:, None], logits[:, width:]], dim=1)


def test_greedy_generate_matches_hf_and_either_padding_side(new_family):
    """Tokens and the logits of every step: a tiny random model's greedy tokens survive even
    decoding positions off by a dozen (M-RoPE), its logits do not."""
    vlm, n = new_family.vlm, 6
    left = prepared(new_family, "left")
    ours, our_logits = generate_with_step_logits(vlm, left, n)
    theirs = new_family.reference.generate(
        **left.inputs,
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=NEVER,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert ours.shape == (len(left), n)
    assert torch.equal(ours, theirs.sequences[:, left.input_ids.shape[1] :])
    hf_logits = torch.stack(theirs.logits, dim=1)
    assert our_logits.shape == hf_logits.shape
    assert (our_logits - hf_logits).abs().max() <= TOL

    right = prepared(new_family, "right")
    assert torch.equal(vlm.generate(right, n, eos_token_id=NEVER), ours)
    if not vlm.adapter.decodes_left_padded:  # Gemma 3, Qwen3.5 refuse return_cache on right padding
        _, right_logits = generate_with_step_logits(vlm, right, n)
        assert (right_logits - our_logits).abs().max() <= TOL


@pytest.mark.parametrize("new_family", ["gemma3"], indirect=True)  # the one with sliding-window layers
def test_gemma3_right_padded_generate_with_a_hook_is_refused(new_family):
    vlm = new_family.vlm
    assert vlm.adapter.sliding_window is not None
    identity = [("blocks.0.hook_resid_post", lambda x, hook: x)]
    left = prepared(new_family, "left")
    with vlm.hooks(fwd_hooks=identity):
        with_hook = vlm.generate(left, 3, eos_token_id=NEVER)  # left padding: allowed
        with pytest.raises(GenerationArgumentError, match="hooks in effect"):
            vlm.generate(prepared(new_family, "right"), 3, eos_token_id=NEVER)
    assert torch.equal(with_hook, vlm.generate(left, 3, eos_token_id=NEVER))
    with pytest.raises(GenerationArgumentError, match="another layout"):  # a cache in the batch's layout
        vlm.generate(
            prepared(new_family, "right"), 3, return_cache=True, names_filter="blocks.0.hook_resid_post"
        )


# ---------------------------------------------------------------- 6. sub-batches
@SIDES
def test_selected_items_equal_their_batched_selves(new_family, padding_side):
    vlm = new_family.vlm
    batch = prepared(new_family, padding_side)
    # oneDNN picks its convolution algorithm by batch size: Gemma 3n's MobileNetV5 gives an image
    # features ~4e-6 apart in a batch of 1 and of 3 (HF's own tower alike); torch's native
    # convolutions do not depend on the batch, and this test is about our batching
    with torch.backends.mkldnn.flags(enabled=False):
        batched = vlm(batch)
        for i in range(len(batch)):
            for sub in (batch[i], batch.select([i])):
                real = sub.attention_mask[0].bool()
                assert torch.equal(real, batch.attention_mask[i].bool())
                assert max_diff(vlm(sub)[0][real], batched[i][real], slice(None)) <= TOL
        # several items, out of order: per-image (per-patch for Qwen) inputs must follow
        sub = batch.select([2, 0])
        real = sub.attention_mask.bool()
        assert max_diff(vlm(sub), batched[[2, 0]], real) <= TOL


# ---------------------------------------------------------------- 7. loading and the CLI
@pytest.fixture(scope="module")
def saved(new_family, tmp_path_factory):
    """The untouched HF model and its processor, saved with ``save_pretrained``."""
    directory = tmp_path_factory.mktemp(f"saved-{new_family.name}")
    new_family.reference.save_pretrained(directory)
    new_family.processor.save_pretrained(directory)
    return directory


def test_from_pretrained_directory_keeps_parity(new_family, saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vlm = HookedVLM.from_pretrained(str(saved))
    assert type(vlm.adapter) is type(new_family.vlm.adapter)
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    expected = new_family.reference(**hf_inputs(new_family, batch)).logits
    assert max_diff(vlm(batch), expected, batch.attention_mask.bool()) <= TOL


def test_cli_phase_diagram_runs_on_a_saved_model(new_family, saved, tmp_path):
    data = make_coco(tmp_path / "coco", n_images=3)  # 3 image sizes: 3 image-token counts where they vary
    out = tmp_path / "out"
    args = ["--model", str(saved), "--dataset", "coco", "--data-dir", str(data), "--n", "3"]
    done = cli(*args, "--batch-size", "2", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    aggregates = json.loads((out / "aggregates.json").read_text())
    assert aggregates["n_items"] == 3
    n_layers = new_family.reference.config.get_text_config().num_hidden_layers
    assert len(aggregates["contextualization"]["inter"]["mean"]) == n_layers + 1  # embedding + layers
    assert (out / "report.html").stat().st_size > 0


# ---------------------------------------------------------------- 8. unsupported
def test_cross_attention_vlm_is_refused_naming_the_supported_families():
    config = MllamaConfig()
    config.architectures = ["MllamaForConditionalGeneration"]
    with pytest.raises(UnsupportedModelError, match="cross-attention") as refused:
        adapter_class_for(config)
    message = str(refused.value)
    for arch in (
        "LlavaNextForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Gemma3ForConditionalGeneration",
    ):
        assert arch in supported_architectures()
        assert arch in message


def test_str_tokens_name_each_image_slot(new_family):
    """One image per item: patches read <img0:0>, <img0:1>, ... in order, structure slots
    (LLaVA-NeXT's row newlines) <img0:newline>, every other real token is text."""
    vlm = new_family.vlm
    batch = prepared(new_family, "right")
    for item in range(len(batch)):
        tokens = vlm.to_str_tokens(batch, item)
        assert len(tokens) == batch.input_ids.shape[1]
        image = batch.image_mask[item].nonzero().flatten().tolist()
        assert [tokens[p] for p in image] == [f"<img0:{k}>" for k in range(len(image))]
        newlines = [p for p, t in enumerate(tokens) if t == "<img0:newline>"]
        slots = batch.image_slots[item][0]
        assert len(newlines) == int((~slots.is_patch).sum())
        placeholders = vlm.adapter.placeholder_mask(batch.input_ids[item]).nonzero().flatten().tolist()
        assert sorted(image + newlines) == placeholders


def test_prompts_follow_the_processors_chat_template(new_family):
    """A processor with a chat template (every real checkpoint) gets its prompts from it: one user
    turn, the images then the instruction, the generation prompt; BOS once, the instruction exactly
    the text tokens."""
    if new_family.name == "blip2":
        pytest.skip("BLIP-2's prompt is the instruction as given (no chat template on its checkpoints)")
    vlm, processor = new_family.vlm, new_family.processor
    image = vlm.adapter.image_text or vlm.adapter.image_placeholder
    template = (
        "{{ bos_token }}{% for m in messages %}<turn>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "<end>\n{% endfor %}{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
    )
    saved = processor.chat_template
    processor.chat_template = template
    try:
        batch = vlm.prepare(family_images()[:2], PROMPTS[:2])
    finally:
        processor.chat_template = saved
    tokenizer = vlm.tokenizer
    adds_bos = tokenizer("").input_ids[:1] == [tokenizer.bos_token_id] and tokenizer.bos_token is not None
    for item, instruction in enumerate(PROMPTS[:2]):
        expected = f"<turn>user\n{image}{instruction}<end>\n<turn>assistant\n"
        assert batch.prompts[item] == (expected if adds_bos else (tokenizer.bos_token or "") + expected)
        ids = batch.input_ids[item][batch.attention_mask[item].bool()].tolist()
        if adds_bos:
            assert ids.count(tokenizer.bos_token_id) == 1
        text = batch.input_ids[item][batch.text_mask[item]]
        assert tokenizer.decode(text).strip() == instruction


def test_a_family_newer_than_the_installed_transformers_is_refused(monkeypatch):
    """PaliGemma was measured exact on transformers 5.23 only (5.22 builds its masks differently):
    an older release gets an error naming the version to install, before any weight is read."""
    import transformers

    from hooked_vllm.adapters import base

    config = transformers.PaliGemmaConfig()
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    monkeypatch.setattr(base, "installed_transformers", lambda: "5.22.0")
    with pytest.raises(UnsupportedModelError, match=r"needs transformers >= 5\.23 \(installed: 5\.22\.0\)"):
        adapter_class_for(config)
    monkeypatch.setattr(base, "installed_transformers", lambda: "5.23.0")
    assert adapter_class_for(config).__name__ == "PaliGemmaAdapter"


def test_videos_are_refused_not_run_as_text(new_family):
    """A processor output with a video (or video placeholders) is refused in one line: running its
    placeholders as text gave LLaVA-OneVision logits 17 away from HF's."""
    vlm = new_family.vlm
    batch = prepared(new_family, "left")
    with_video_key = {**batch.inputs, "pixel_values_videos": torch.zeros(1, 1, 3, 8, 8)}
    with pytest.raises(BatchFormatError, match="video.*images only"):
        vlm(with_video_key)
    if vlm.adapter.video_token_ids:
        ids = batch.input_ids.clone()
        ids[0, batch.last_positions[0]] = vlm.adapter.video_token_ids[0]
        with pytest.raises(BatchFormatError, match="video"):
            vlm({**batch.inputs, "input_ids": ids})


def test_raw_processor_output_counts_no_image_structure_as_text(new_family):
    """Without instruction spans (a processor's own output) text is every real token that is not part
    of an image's expansion nor a special token: the instruction's tokens are among it, and nothing
    the processor wrote for an image is (Gemma 3's blank lines, Idefics3's markers...)."""
    vlm = new_family.vlm
    prepared_batch = prepared(new_family, "left")
    raw = vlm.to_batch(dict(prepared_batch.inputs))
    assert not raw.exact_text_spans
    assert not (raw.text_mask & ~prepared_batch.attention_mask.bool()).any()
    assert (raw.text_mask | ~prepared_batch.text_mask).all(), "the instruction is text"
    expansion = vlm.adapter.image_text_mask(raw.input_ids) & raw.attention_mask.bool()
    assert not (raw.text_mask & expansion).any()
