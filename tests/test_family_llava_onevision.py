"""LLaVA-OneVision's own checks (the shared bar: tests/test_families.py, tests/test_family_lenses.py).

OneVision is LLaVA-NeXT's layout (base tile, then the unpadded high-resolution canvas with an
``image_newline`` slot after each row, every slot the ``<image>`` id) on a SigLIP tower and a Qwen2
language model, plus the ``anyres_max`` downscale (a canvas larger than ``max`` tiles is bilinearly
shrunk before the newlines are appended) and ``batch_num_images`` (an image that shares its prompt is
not tiled). These tests pin: the image mask is exactly the patch slots (newlines are structure), the
slot counts of the three test images (three tile grids, one unpadded canvas, one downscaled canvas)
from an independent count, what HF 5.23's ``get_image_features`` returns and that it is exactly
what HF's forward scatters, each slot's (tile, row, col) against a hand-written packing of the
projector's per-tile outputs, several images per prompt, raw processor outputs, the Qwen2 view and
the chat-template prompt.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from hooked_vllm.tiny_models.llava_onevision import ONEVISION_CHAT_TEMPLATE
from tests.conftest import family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
ONEVISION = pytest.mark.parametrize("new_family", ["llava_onevision"], indirect=True)
SIDE, PER_TILE = 4, 16  # 24px tiles, patch 6


def hf_logits(family, batch, inputs=None) -> torch.Tensor:
    inputs = dict(batch.inputs if inputs is None else inputs)
    return family.reference(**inputs, position_ids=batch.position_ids).logits


def max_diff(a, b, where) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b)[where].abs().max().item()


def canvas_geometry(config, image_size):
    """``((tiles_h, tiles_w), (rows, cols) unpadded, (rows, cols) after anyres_max)`` of an image
    alone in its prompt, written out from OneVision's rule (HF's helpers only for the tile grid
    and the unpadding, which LLaVA-NeXT's tests pin)."""
    tiles = get_anyres_image_grid_shape(
        image_size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    rows, cols = unpad_image(torch.zeros(1, tiles[0] * SIDE, tiles[1] * SIDE), image_size).shape[1:]
    most = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (most * SIDE * SIDE))
    kept = (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else (rows, cols)
    return tuple(tiles), (rows, cols), kept


# ---------------------------------------------------------------- geometry of the tiny model
@ONEVISION
def test_three_tile_grids_one_unpadded_and_one_downscaled_canvas(new_family):
    config, processor = new_family.reference.config, new_family.processor
    assert config.vision_feature_select_strategy == "full"  # SigLIP: no CLS to drop
    assert processor.vision_aspect_ratio == config.vision_aspect_ratio == "anyres_max_2"
    assert processor.num_image_tokens == PER_TILE
    sizes = [[h, w] for w, h in [image.size for image in family_images()]]
    geometry = [canvas_geometry(config, size) for size in sizes]
    assert geometry == [
        ((1, 2), (4, 8), (4, 8)),  # 48x24: kept as it is
        ((3, 1), (8, 4), (8, 4)),  # 24x48: a 12x4 canvas, unpadded to 8x4, kept
        ((2, 2), (8, 8), (5, 5)),  # 40x40: downscaled by sqrt(64 / 32) = 1.41
    ]
    # the processor's placeholder count is the same (its own copy of the rule)
    for size, (_, _, (rows, cols)) in zip(sizes, geometry):
        assert processor._get_number_of_features(*size, 24, 24) == PER_TILE + rows * cols + rows


# ---------------------------------------------------------------- image positions
@ONEVISION
@SIDES
def test_image_mask_is_exactly_the_image_patch_positions(new_family, padding_side):
    vlm, config = new_family.vlm, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    _, cache = vlm.run_with_cache(batch, names_filter=["hook_embed", "hook_visual_prefix"])
    ids, real = batch.input_ids, batch.attention_mask.bool()
    placeholders = vlm.adapter.placeholder_mask(ids)
    embed = cache["hook_embed"]

    assert torch.equal(placeholders & real, (ids == config.image_token_id) & real)
    assert torch.equal(embed[placeholders], cache["hook_visual_prefix"])
    # per image: base tile + canvas patches, and one newline per canvas row (counted independently)
    sizes = batch.inputs["image_sizes"].tolist()
    counts = [
        (PER_TILE + rows * cols, rows) for _, _, (rows, cols) in (canvas_geometry(config, s) for s in sizes)
    ]
    assert counts == [(48, 4), (48, 8), (41, 5)]
    assert batch.image_mask.sum(-1).tolist() == [patches for patches, _ in counts]
    assert placeholders.sum(-1).tolist() == [patches + rows for patches, rows in counts] == [52, 56, 46]

    # the newline slots hold image_newline, are special, and no patch slot holds it
    newline = new_family.reference.model.image_newline
    newline_slots = placeholders & ~batch.image_mask
    assert torch.equal(embed[newline_slots], newline.expand(int(newline_slots.sum()), -1))
    assert not (embed[batch.image_mask] == newline).all(-1).any()
    assert batch.special_mask[newline_slots].all() and not batch.text_mask[newline_slots].any()
    # ... each right after a canvas row: the base tile (no newline) comes first, then rows of `cols`
    for item, (slots,) in enumerate(batch.image_slots):
        rows, cols = canvas_geometry(config, sizes[item])[2]
        where = (~slots.is_patch).nonzero().flatten().tolist()
        assert where == [PER_TILE + (r + 1) * (cols + 1) - 1 for r in range(rows)]
        # the image's placeholder run: the patch slots of the layout are the image-mask positions
        run = placeholders[item].nonzero().flatten()
        assert torch.equal(batch.image_mask[item, run], slots.is_patch)


# ---------------------------------------------------------------- what HF computes and scatters
@ONEVISION
def test_get_image_features_is_packed_per_image_with_the_newlines(new_family):
    """In transformers 5.23, OneVision's ``get_image_features(...).pooler_output`` is a list, one
    ``[slots, d]`` tensor per image, already packed (base, canvas, newline per row); HF's forward
    scatters ``torch.cat`` of it, which is the adapter's visual prefix, exactly."""
    vlm, reference = new_family.vlm, new_family.reference
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    pooled = reference.model.get_image_features(
        batch.pixel_values, batch.inputs["image_sizes"], return_dict=True
    ).pooler_output
    assert isinstance(pooled, list)
    assert [p.shape for p in pooled] == [(n, 64) for n in (52, 56, 46)]
    for features, (slots,) in zip(pooled, batch.image_slots):
        newlines = features[~slots.is_patch]
        assert torch.equal(newlines, reference.model.image_newline.expand(len(newlines), -1))
    _, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
    output = reference(**batch.inputs, position_ids=batch.position_ids)
    # transformers 5.24 moved the scattered features from image_hidden_states (one tensor) to
    # image_outputs.pooler_output (a list, one tensor per image)
    images_out = output.get("image_outputs")
    scattered = output.image_hidden_states if images_out is None else torch.cat(images_out.pooler_output)
    assert torch.equal(cache["hook_visual_prefix"], torch.cat(pooled))
    assert torch.equal(cache["hook_visual_prefix"], scattered)


def naive_pack(tile_features, image_size, config):
    """OneVision's canvas by hand from the crops' features (tile 0, the base view, is not in it):
    ``(canvas [rows, cols, d] unpadded and maybe downscaled, downscaled)``."""
    (tiles_h, tiles_w), (rows, cols), kept = canvas_geometry(config, image_size)
    canvas = tile_features[1:].view(tiles_h, tiles_w, SIDE, SIDE, -1).permute(0, 2, 1, 3, 4)
    canvas = canvas.reshape(tiles_h * SIDE, tiles_w * SIDE, -1)
    height, width = image_size
    if width / height > canvas.shape[1] / canvas.shape[0]:  # unpad rows
        pad = (canvas.shape[0] - int(round(height * canvas.shape[1] / width, 7))) // 2
        canvas = canvas[pad : canvas.shape[0] - pad]
    else:  # unpad columns
        pad = (canvas.shape[1] - int(round(width * canvas.shape[0] / height, 7))) // 2
        canvas = canvas[:, pad : canvas.shape[1] - pad]
    assert canvas.shape[:2] == (rows, cols)
    downscaled = kept != (rows, cols)
    if downscaled:
        canvas = torch.nn.functional.interpolate(canvas.permute(2, 0, 1)[None], list(kept), mode="bilinear")
        canvas = canvas[0].permute(1, 2, 0)
    return canvas, downscaled


@ONEVISION
def test_each_slot_is_the_patch_its_layout_names(new_family):
    """(tile, row, col) against a hand-written packing of the projector's per-tile outputs: base
    slots are tile 0; a kept canvas's slots are exactly patch (row, col) of crop ``tile`` (1..); a
    downscaled canvas (40x40 here) has no slot-to-patch map (HF's packing of slot indices gives
    blends), so its slots are (1, row, col) on the downscaled grid, cell (row, col) of the
    interpolated canvas."""
    vlm, reference = new_family.vlm, new_family.reference
    config = reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    projected = []
    handle = reference.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: projected.append(output)
    )
    try:
        reference.model.get_image_features(batch.pixel_values, batch.inputs["image_sizes"])
    finally:
        handle.remove()
    (per_tile_features,) = projected  # [tiles of all images, 16, d]
    _, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
    prefix = cache["hook_visual_prefix"].split([len(s) for (s,) in batch.image_slots])
    newline = reference.model.image_newline
    tiles_so_far = 0
    downscaled_images = []
    for item, (slots,) in enumerate(batch.image_slots):
        size = batch.inputs["image_sizes"][item].tolist()
        (tiles_h, tiles_w), _, (rows, cols) = canvas_geometry(config, size)
        n_tiles = 1 + tiles_h * tiles_w
        tiles = per_tile_features[tiles_so_far : tiles_so_far + n_tiles]
        tiles_so_far += n_tiles
        canvas, downscaled = naive_pack(tiles, size, config)
        downscaled_images.append(downscaled)
        # the whole packed sequence, by hand
        with_newlines = torch.cat([canvas, newline.expand(rows, 1, -1)], dim=1).flatten(0, 1)
        assert (prefix[item] - torch.cat([tiles[0], with_newlines])).abs().max() <= 1e-6
        # slot by slot, through the layout
        grid = slots.grid
        for k, (tile, row, col) in enumerate(grid.tolist()):
            if row < 0:
                assert (tile, row, col) == (-1, -1, -1) and torch.equal(prefix[item][k], newline)
            elif tile == 0 or not downscaled:
                assert 0 <= row < SIDE and 0 <= col < SIDE
                assert torch.equal(prefix[item][k], tiles[tile][row * SIDE + col])
            else:
                assert tile == 1 and (prefix[item][k] - canvas[row, col]).abs().max() <= 1e-6
        base = grid[:PER_TILE]
        k = torch.arange(PER_TILE)
        assert torch.equal(base, torch.stack([0 * k, k // SIDE, k % SIDE], -1))
        if downscaled:  # row-major on the downscaled grid
            cells = grid[PER_TILE:][slots.is_patch[PER_TILE:]]
            k = torch.arange(rows * cols)
            assert torch.equal(cells, torch.stack([0 * k + 1, k // cols, k % cols], -1))
        else:  # every kept patch once: a slot-to-patch map
            patches = {tuple(cell) for cell in grid[PER_TILE:][slots.is_patch[PER_TILE:]].tolist()}
            assert len(patches) == rows * cols and {t for t, _, _ in patches} <= set(range(1, n_tiles))
    assert downscaled_images == [False, False, True]

    # why: HF's own packing of slot indices blends them on the downscaled canvas only
    ids = [torch.arange(5 * PER_TILE, dtype=torch.float64).view(5, PER_TILE, 1)]
    (packed,), _ = reference.model.pack_image_features(
        ids,
        batch.inputs["image_sizes"][2:],
        image_newline=None,
        vision_aspect_ratio=config.vision_aspect_ratio,
    )
    assert (packed[PER_TILE:] != packed[PER_TILE:].round()).any()


# ---------------------------------------------------------------- several images per prompt
@ONEVISION
@SIDES
def test_images_sharing_a_prompt_are_not_tiled(new_family, padding_side):
    """``batch_num_images``: an image alone in its prompt is tiled, images that share one are their
    base view plus a newline (17 slots), as HF's processor and model agree; it stays one entry per
    item (0 for a text-only item) so sub-batches take theirs along."""
    vlm = new_family.vlm
    a, b, c = family_images()
    batch = vlm.prepare([[a, b], [], c], ["two", "none at all", "one"], padding_side=padding_side)
    assert batch.inputs["batch_num_images"].tolist() == [2, 0, 1]
    assert [[len(s) for s in item] for item in batch.image_slots] == [[17, 17], [], [46]]
    k = torch.arange(PER_TILE)
    untiled = torch.cat([torch.stack([0 * k, k // SIDE, k % SIDE], -1), torch.tensor([[-1, -1, -1]])])
    for slots in batch.image_slots[0]:
        assert torch.equal(slots.grid, untiled)
    assert batch.image_mask.sum(-1).tolist() == [32, 0, 41]
    real = batch.attention_mask.bool()
    logits = vlm(batch)
    assert max_diff(logits, hf_logits(new_family, batch), real) <= TOL
    sub = batch.select([2, 0])
    assert sub.inputs["batch_num_images"].tolist() == [1, 2]
    assert max_diff(vlm(sub), logits[[2, 0]], sub.attention_mask.bool()) <= TOL
    alone = vlm.prepare([[a, b]], ["two"], padding_side=padding_side)
    assert "batch_num_images" in alone.inputs
    assert (vlm(alone)[0] - logits[0][real[0]]).abs().max() <= TOL


@ONEVISION
def test_raw_processor_outputs_keep_hf_semantics(new_family):
    """A processor output passed as it is: a flat image list (``batch_num_images`` all 1, one per
    image) and a nested one with a text-only item (one per item with images) give HF's logits."""
    vlm, processor = new_family.vlm, new_family.processor
    a, b, c = family_images()
    one = vlm.adapter.format_prompt("Describe the image.", 1)[0]
    two = vlm.adapter.format_prompt("Compare them.", 2)[0]
    none = vlm.adapter.format_prompt("Just text here.", 0)[0]
    for images, prompts, stored in [
        ([a, b, c, a], [one, two, one], None),  # flat: every image tiled, as HF does without the key
        ([[b, c], [], [a]], [two, none, one], [2, 0, 1]),
    ]:
        raw = processor(images=images, text=prompts, return_tensors="pt", padding=True)
        batch = vlm.to_batch(dict(raw))
        got = batch.inputs.get("batch_num_images")
        assert (got if got is None else got.tolist()) == stored
        real = batch.attention_mask.bool()
        assert max_diff(vlm(batch), hf_logits(new_family, batch, raw), real) <= TOL


# ---------------------------------------------------------------- the language model and prompts
@ONEVISION
def test_language_model_is_a_qwen2_view_of_the_decoder(new_family):
    vlm = new_family.vlm
    view = vlm.adapter.language_model()
    assert type(view) is transformers.Qwen2ForCausalLM
    assert view.model is vlm.hf_model.model.language_model and view.lm_head is vlm.hf_model.lm_head
    assert vlm.adapter.sliding_window is None and vlm.adapter.plain_causal
    assert (vlm.cfg.n_layers, vlm.cfg.d_model, vlm.cfg.n_heads) == (3, 64, 4)
    batch = vlm.prepare(family_images()[:1], PROMPTS[:1])
    _, cache = vlm.run_with_cache(batch, names_filter=lambda n: n.endswith(("hook_rot_q", "hook_rot_k")))
    assert len(cache.keys()) == 2 * vlm.cfg.n_layers  # RoPE runs in transformer-lens's attention


@ONEVISION
def test_prompt_is_onevision_chat_template(new_family):
    vlm, processor = new_family.vlm, new_family.processor
    assert processor.chat_template == ONEVISION_CHAT_TEMPLATE
    prompt, (start, end) = vlm.adapter.format_prompt("What is it?", 2)
    assert prompt == "<|im_start|>user\n<image>\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\n"
    assert prompt[start:end] == "What is it?"
    processor.chat_template = None  # a processor without one: the adapter's template says the same
    try:
        assert vlm.adapter.format_prompt("What is it?", 2) == (prompt, (start, end))
    finally:
        processor.chat_template = ONEVISION_CHAT_TEMPLATE
    batch = vlm.prepare(family_images()[:1], ["What is it?"])
    assert vlm.tokenizer.decode(batch.input_ids[0][batch.text_mask[0]]) == "What is it?"
