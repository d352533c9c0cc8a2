"""Mistral 3 (Pixtral tower, patch merger, Ministral 3 / Mistral text model). The shared bar
(tests/test_families.py, tests/test_family_lenses.py) runs on the tiny model; this file checks what is
particular to it: ``[IMG_BREAK]``/``[IMG_END]`` are structure (special, not image, not slots), each
slot is the merged 2x2 patch block its layout names (HF's merger), the Pixtral tower's hook points,
Ministral 3's position-dependent query scale (it is exercised, and positions are counted over real
tokens), and Mistral Small 3.1's plain Mistral text model."""

from __future__ import annotations

import copy

import pytest
import torch

from hooked_vllm import HookedVLM
from hooked_vllm.tiny_models.mistral3 import LLAMA_4_PERIOD, tiny_mistral3
from tests.conftest import family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
MISTRAL3 = pytest.mark.parametrize("new_family", ["mistral3"], indirect=True)
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
TOL = 1e-5
#: (rows, cols) of slots of the test images 48x24, 24x48, 40x40 (w x h): 8px cells, longest edge 48
GRIDS = [(3, 6), (6, 3), (5, 5)]


def max_diff(a, b, where):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[where].abs().max().item()


def break_ids(adapter):
    return torch.tensor(adapter.structure_token_ids)


@MISTRAL3
@SIDES
def test_image_mask_is_the_img_slots_and_breaks_are_special(new_family, padding_side):
    """Each image is ``rows`` runs of ``cols`` ``[IMG]`` slots, each run closed by ``[IMG_BREAK]``
    (the last by ``[IMG_END]``): the slots are image, the closers special, and they hold their own
    token embedding (HF does not scatter features there)."""
    vlm, config = new_family.vlm, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    img_break, img_end = vlm.adapter.structure_token_ids
    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    assert batch.image_mask.sum(-1).tolist() == [r * c for r, c in GRIDS]
    closers = torch.isin(ids, break_ids(vlm.adapter)) & real
    assert closers.sum(-1).tolist() == [r for r, _ in GRIDS]
    assert batch.special_mask[closers].all() and not batch.text_mask[closers].any()
    assert [len(item[0]) for item in batch.image_slots] == [r * c for r, c in GRIDS]

    for item, (rows, cols) in enumerate(GRIDS):
        expansion = ids[item][vlm.adapter.image_text_mask(ids)[item] & real[item]].tolist()
        row = [config.image_token_id] * cols
        assert expansion == (row + [img_break]) * (rows - 1) + row + [img_end]

    _, cache = vlm.run_with_cache(batch, names_filter="hook_embed")
    embedding = new_family.reference.get_input_embeddings()
    assert torch.equal(cache["hook_embed"][closers], embedding(ids[closers]))


@MISTRAL3
def test_each_slot_is_the_merged_patch_block_its_layout_names(new_family):
    """HF's patch merger on each patch's own (row, col) instead of its features: slot k of an image
    holds the 2x2 block whose top-left patch is (2 row, 2 col) of the layout's (row, col); the slots
    run row-major, and the ``[IMG_BREAK]`` after each run of ``cols`` slots ends a layout row."""
    vlm, model = new_family.vlm, new_family.reference.model
    merge = new_family.reference.config.spatial_merge_size
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    merger = copy.deepcopy(model.multi_modal_projector.patch_merger)
    # unfold orders each slot's inputs channel-major over the 2x2 block: element 0 is channel 0
    # (row) of the top-left patch, element merge**2 channel 1 (col) of it
    merger.merging_layer = torch.nn.Linear(2 * merge**2, 2, bias=False)
    with torch.no_grad():
        merger.merging_layer.weight.zero_()
        merger.merging_layer.weight[0, 0] = merger.merging_layer.weight[1, merge**2] = 1.0
    patch = new_family.reference.config.vision_config.patch_size
    sizes = batch.inputs["image_sizes"]
    cells = []
    for h, w in (sizes // patch).tolist():
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cells.append(torch.stack([r.flatten(), c.flatten()], -1).double())
    merger.double()
    corners = merger(torch.cat(cells), sizes).long()
    layout = torch.cat([slots.grid for item in batch.image_slots for slots in item])
    assert torch.equal(layout[:, 0], torch.zeros_like(layout[:, 0]))
    assert torch.equal(corners, layout[:, 1:] * merge)
    for item, (rows, cols) in enumerate(GRIDS):
        (slots,) = batch.image_slots[item]
        assert torch.equal(slots.patch_index()[0], torch.arange(rows * cols).view(rows, cols))


@MISTRAL3
def test_vision_tower_hooks_are_hf_hidden_states(new_family):
    """``vision.blocks.{i}.hook_resid_post`` is the Pixtral layer's output: all images of the batch as
    one sequence (each image's patches, cut to its real size), as HF's tower returns them."""
    vlm, model = new_family.vlm, new_family.reference.model
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: name.startswith("vision."))
    hidden = model.vision_tower(
        batch.inputs["pixel_values"], image_sizes=batch.inputs["image_sizes"], output_hidden_states=True
    ).hidden_states
    patch = new_family.reference.config.vision_config.patch_size
    n_patches = int((batch.inputs["image_sizes"] // patch).prod(-1).sum())
    layers = new_family.reference.config.vision_config.num_hidden_layers
    for layer in range(layers):
        ours = cache[f"vision.blocks.{layer}.hook_resid_post"]
        assert ours.shape == (1, n_patches, hidden[layer + 1].shape[-1])
        assert (ours - hidden[layer + 1]).abs().max() <= TOL


@MISTRAL3
@SIDES
def test_ministral3_query_scale_is_exercised_and_counted_over_real_tokens(new_family, padding_side):
    """Ministral 3 multiplies each query by ``1 + beta log(1 + floor(pos / period))``: the tiny prompts
    run past the period, so HF without the scale differs from us (the parity tests would catch its
    loss), and HF counting positions over the padding too (its forward's default) differs on padded
    items, though RoPE alone would not see a uniform shift."""
    vlm, reference = new_family.vlm, new_family.reference
    rope = vlm.adapter.text_config.rope_parameters
    assert rope["llama_4_scaling_beta"] == 0.1
    assert rope["original_max_position_embeddings"] == LLAMA_4_PERIOD
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    assert int(batch.position_ids[real].max()) >= 2 * LLAMA_4_PERIOD
    ours = vlm(batch)
    assert max_diff(ours, reference(**hf_forward_inputs(new_family, batch)).logits, real) <= TOL

    unscaled = copy.deepcopy(reference)
    unscaled.config.get_text_config().rope_parameters["llama_4_scaling_beta"] = 0.0
    assert max_diff(ours, unscaled(**hf_forward_inputs(new_family, batch)).logits, real) > 1e-3

    if padding_side == "left":
        counted_over_padding = reference(**batch.inputs).logits  # arange positions, padding included
        padded = batch.attention_mask.sum(-1) < batch.attention_mask.shape[1]
        where = real & padded[:, None]
        assert max_diff(ours, counted_over_padding, where) > 1e-3


@pytest.fixture(scope="module")
def mistral_text(tmp_path_factory):
    """Mistral Small 3.1's layout: the plain Mistral text model (no query scale)."""
    hf_model, processor = tiny_mistral3(
        directory=tmp_path_factory.mktemp("mistral3-mistral"), text_model="mistral"
    )
    reference = copy.deepcopy(hf_model)
    return HookedVLM.from_hf(hf_model, processor), reference


@SIDES
def test_mistral_text_model_layer_by_layer_parity(mistral_text, padding_side):
    vlm, reference = mistral_text
    assert reference.config.get_text_config().model_type == "mistral"
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    logits, cache = vlm.run_with_cache(batch)
    inputs = {**batch.inputs, "position_ids": batch.position_ids}
    outputs = []
    last_layer = reference.model.language_model.layers[-1]
    handle = last_layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        out = reference(**inputs, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    assert max_diff(logits, out.logits, real) <= TOL
    pair = real[:, None, :, None] & real[:, None, None, :]
    for layer in range(vlm.cfg.n_layers):
        assert max_diff(cache[f"blocks.{layer}.hook_resid_pre"], out.hidden_states[layer], real) <= TOL
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert (pattern - out.attentions[layer]).abs().masked_fill(~pair, 0).max() <= TOL
    (last,) = outputs
    last = last[0] if isinstance(last, tuple) else last
    assert max_diff(cache[f"blocks.{vlm.cfg.n_layers - 1}.hook_resid_post"], last, real) <= TOL


@MISTRAL3
@SIDES
def test_several_images_in_one_prompt_and_none_in_another(new_family, padding_side):
    """Each image keeps its own grid (``image_sizes`` one row per image); a text-only item has none;
    selecting items takes their images' rows along."""
    vlm, reference = new_family.vlm, new_family.reference
    a, b, c = family_images()
    batch = vlm.prepare([[a, b], [], c], ["two", "none at all", "one"], padding_side=padding_side)
    assert [[len(slots) for slots in item] for item in batch.image_slots] == [[18, 18], [], [25]]
    real = batch.attention_mask.bool()
    logits = vlm(batch)
    assert max_diff(logits, reference(**hf_forward_inputs(new_family, batch)).logits, real) <= TOL
    sub = batch.select([2, 0])
    assert sub.inputs["image_sizes"].tolist() == batch.inputs["image_sizes"][[2, 0, 1]].tolist()
    assert max_diff(vlm(sub), logits[[2, 0]], sub.attention_mask.bool()) <= TOL
