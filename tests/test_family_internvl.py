"""InternVL's own checks (the shared bar runs in tests/test_families.py and tests/test_family_lenses.py).

InternVL cuts an image into tiles plus a thumbnail, each tile a square grid of ``<IMG_CONTEXT>``
slots, bracketed by ``<img>``/``</img>``; ``pixel_values`` has one row per tile. These tests pin what
only this family has: the image mask is exactly the context slots (HF's ``processor.image_token_ids``
counts the brackets too), each image's tile count as HF's image processor gives it, the tile layout
(which tile is the thumbnail), one-tile images, several images per prompt, and the prompt template.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
INTERNVL = pytest.mark.parametrize("new_family", ["internvl"], indirect=True)

#: the chat template of the InternVL3 ``-hf`` checkpoints (ChatML; an image is ``<IMG_CONTEXT>\n``)
INTERNVL3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def image(width: int, height: int, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_tiles(processor, images) -> list[int]:
    """Tiles per image as HF's image processor cuts them (its ``num_patches``, which the
    InternVL processor drops from its output)."""
    return list(processor.image_processor(images=images, crop_to_patches=True)["num_patches"])


def hf_logits(family, batch) -> torch.Tensor:
    return family.reference(**batch.inputs, position_ids=batch.position_ids).logits


# ---------------------------------------------------------------- image positions
@INTERNVL
@SIDES
def test_image_mask_is_exactly_the_context_slots(new_family, padding_side):
    vlm, processor, config = new_family.vlm, new_family.processor, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    start, end = processor.start_image_token_id, processor.end_image_token_id

    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    # HF's processor counts <img> and </img> as image tokens: they are structure here (special)
    hf_image = torch.isin(ids, torch.tensor(processor.image_token_ids)) & real
    brackets = hf_image & ~batch.image_mask
    assert torch.equal(brackets, torch.isin(ids, torch.tensor([start, end])) & real)
    assert batch.special_mask[brackets].all() and not batch.text_mask[brackets].any()
    # one image per item: one run of context slots, right between <img> and </img>
    for i, runs in enumerate(batch.ranges("image")):
        ((first, last),) = runs
        assert ids[i, first - 1] == start and ids[i, last] == end
        assert int((ids[i] == start).sum()) == int((ids[i] == end).sum()) == 1

    # slots per item: HF's tile count times the slots per tile; the counts differ across the batch
    per_tile = processor.image_seq_length
    assert per_tile == vlm.adapter.slots_per_tile == 16
    tiles = hf_tiles(processor, family_images())
    assert tiles == [3, 3, 5]  # 48x24: 2x1 + thumbnail, 24x48: 1x2 + thumbnail, 40x40: 2x2 + thumbnail
    assert batch.image_mask.sum(-1).tolist() == [per_tile * t for t in tiles]
    assert [sum(len(s) for s in item) for item in batch.image_slots] == [per_tile * t for t in tiles]

    # the visual prefix sits at the context slots only; <img>/</img> keep their token embeddings
    _, cache = vlm.run_with_cache(batch, names_filter=["hook_embed", "hook_visual_prefix"])
    embed = cache["hook_embed"]
    assert torch.equal(embed[batch.image_mask], cache["hook_visual_prefix"])
    token_embedding = new_family.reference.get_input_embeddings()
    assert torch.equal(embed[brackets], token_embedding(ids[brackets]))


# ---------------------------------------------------------------- tiles
@INTERNVL
@SIDES
def test_pixel_rows_per_image_are_its_tiles(new_family, padding_side):
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    tiles = hf_tiles(new_family.processor, family_images())
    assert batch.image_rows == {"pixel_values": tiles}
    assert batch.pixel_values.shape[0] == sum(tiles)
    starts = np.cumsum([0, *tiles])
    for i in range(len(batch)):
        sub = batch.select([i])
        assert torch.equal(sub.pixel_values, batch.pixel_values[starts[i] : starts[i + 1]])
        assert sub.image_rows == {"pixel_values": [tiles[i]]}
    sub = batch.select([2, 0])
    assert torch.equal(sub.pixel_values, torch.cat([batch.pixel_values[starts[2] :], batch.pixel_values[:3]]))


@INTERNVL
def test_tile_layout_thumbnail_is_tile_0_and_last(new_family):
    vlm, processor = new_family.vlm, new_family.processor
    batch = vlm.prepare(family_images(), PROMPTS)
    per_tile, side = 16, 4
    k = torch.arange(per_tile)
    for item, tiles in enumerate([3, 3, 5]):
        (slots,) = batch.image_slots[item]
        assert slots.spatial and bool(slots.is_patch.all())
        grid = slots.grid.view(tiles, per_tile, 3)
        # crops 1..n first (HF's order, row-major on the canvas), the thumbnail (tile 0) last
        assert grid[:, :, 0].tolist() == [[t] * per_tile for t in [*range(1, tiles), 0]]
        for tile in grid:  # each tile: its slots row-major on a 4x4 grid
            assert torch.equal(tile[:, 1:], torch.stack([k // side, k % side], -1))

    # tile 0 is the whole image: the last tile of each image is the image resized to one tile
    starts = np.cumsum([0, 3, 3, 5])
    for i, picture in enumerate(family_images()):
        whole = processor.image_processor(images=[picture], crop_to_patches=False, return_tensors="pt")
        thumbnail = batch.pixel_values[starts[i + 1] - 1]
        assert torch.allclose(thumbnail, whole["pixel_values"][0], atol=1e-6)
        assert not torch.allclose(batch.pixel_values[starts[i]], thumbnail, atol=1e-3)  # a crop is not it


@INTERNVL
def test_slot_grid_is_hf_pixel_shuffle_of_2x2_patches(new_family):
    """Slot (row, col) of a tile merges the ViT patches (2row..2row+1, 2col..2col+1), as HF's own
    ``pixel_shuffle`` lays them out (checked on the patches' coordinates)."""
    model = new_family.reference.model
    side = 8  # 16px tiles, patch 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([rows, cols], -1).double()[None]
    merged = model.pixel_shuffle(coords, scale_factor=0.5).reshape(-1, 4, 2).long()
    grid = new_family.vlm.adapter._tile_grid()
    assert grid.shape == (16, 2)
    for (row, col), patches in zip(grid.tolist(), merged):
        assert sorted(map(tuple, patches.tolist())) == [
            (2 * row + dr, 2 * col + dc) for dr in (0, 1) for dc in (0, 1)
        ]


# ---------------------------------------------------------------- one tile, several images per prompt
@INTERNVL
@SIDES
def test_one_tile_image_and_several_images_per_prompt_match_hf(new_family, padding_side):
    vlm, processor = new_family.vlm, new_family.processor
    small = image(20, 20)  # one tile, no thumbnail
    images = [[family_images()[0], small], [family_images()[2]]]
    batch = vlm.prepare(images, ["Compare the two pictures.", "cat"], padding_side=padding_side)
    assert batch.attention_mask.min() == 0
    tiles = hf_tiles(processor, [family_images()[0], small, family_images()[2]])
    assert tiles == [3, 1, 5]
    assert batch.image_rows == {"pixel_values": tiles}
    assert [[len(s) // 16 for s in item] for item in batch.image_slots] == [[3, 1], [5]]
    assert batch.image_slots[0][1].grid[:, 0].eq(0).all()  # the one tile is the whole image: tile 0
    assert [len(runs) for runs in batch.ranges("image")] == [2, 1]

    real = batch.attention_mask.bool()
    logits = vlm(batch)
    assert (logits - hf_logits(new_family, batch))[real].abs().max() <= TOL
    for i in range(len(batch)):
        sub = batch.select([i])
        mask = sub.attention_mask[0].bool()
        assert (vlm(sub)[0][mask] - logits[i][mask]).abs().max() <= TOL


# ---------------------------------------------------------------- prompts
@INTERNVL
def test_fallback_prompt_is_the_internvl3_chat_template(new_family):
    """Without a chat template (the tiny processor) prompts are what InternVL3's template gives:
    ChatML, each image written as the processor's ``<IMG_CONTEXT>`` on its own line."""
    vlm, processor = new_family.vlm, new_family.processor
    assert not processor.chat_template
    assert vlm.adapter.image_placeholder == processor.image_token == "<IMG_CONTEXT>"
    fallback = [vlm.adapter.format_prompt("What colour?", n) for n in (1, 2)]
    processor.chat_template = INTERNVL3_CHAT_TEMPLATE
    try:
        templated = [vlm.adapter.format_prompt("What colour?", n) for n in (1, 2)]
        with_template = vlm.prepare(family_images()[:2], PROMPTS[:2])
    finally:
        processor.chat_template = None
    assert fallback == templated
    assert fallback[0][0] == (
        "<|im_start|>user\n<IMG_CONTEXT>\nWhat colour?<|im_end|>\n<|im_start|>assistant\n"
    )
    without = vlm.prepare(family_images()[:2], PROMPTS[:2])
    assert torch.equal(with_template.input_ids, without.input_ids)
    for item, instruction in enumerate(PROMPTS[:2]):
        text = without.input_ids[item][without.text_mask[item]]
        assert vlm.tokenizer.decode(text) == instruction
