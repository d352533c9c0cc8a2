"""Idefics3 and SmolVLM: image tiles plus a global image, pixel shuffle, structure tokens around the
slots. The shared bar (tests/test_families.py, tests/test_family_lenses.py) runs on both tiny models;
this file checks what is particular to them: which positions are image patches, the tile layout,
per-image pixel rows, HF's dropping of all-zero tiles, and SmolVLM's processor without ``num2words``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.models.smolvlm import processing_smolvlm

from hooked_vllm.errors import ImageCountError
from hooked_vllm.model.batch import build_batch
from tests.conftest import family_images, hf_forward_inputs

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
FAMILIES = pytest.mark.parametrize("new_family", ["idefics3", "smolvlm"], indirect=True)
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
#: tiles (rows, cols) of the test images 48x24, 24x48, 40x40 (w x h): each image its own grid
TILE_GRIDS = {"idefics3": [(1, 2), (2, 1), (2, 2)], "smolvlm": [(2, 3), (3, 2), (3, 3)]}


def structure_ids(adapter):
    """``<fake_token_around_image>``, ``<global-img>`` and every ``<row_i_col_j>``."""
    tokenizer = adapter.tokenizer
    rows_cols = [
        tokenizer.convert_tokens_to_ids(f"<row_{r}_col_{c}>") for r in range(1, 7) for c in range(1, 7)
    ]
    return torch.tensor([adapter.fake_image_token_id, adapter.global_image_token_id, *rows_cols])


def tile_grids(new_family):
    """(rows, cols) of each test image, from HF's image processor."""
    image_processor = new_family.processor.image_processor
    grids = []
    for image in family_images():
        _, rows, cols = image_processor.get_number_of_image_patches(image.height, image.width)
        grids.append((rows, cols))
    return grids


def image_seq_len(config):
    side = config.vision_config.image_size // config.vision_config.patch_size
    return side * side // config.scale_factor**2


@FAMILIES
@SIDES
def test_image_mask_is_exactly_the_image_slot_positions(new_family, padding_side):
    """Only the ``<image>`` slots are image; ``<fake_token_around_image>``, ``<row_i_col_j>``,
    ``<global-img>`` and the newlines between tile rows are special (HF's Idefics3 processor counts
    them as image in its ``mm_token_type_ids``; we do not)."""
    vlm, config = new_family.vlm, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    adapter = vlm.adapter

    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    assert torch.equal(adapter.placeholder_mask(ids) & real, batch.image_mask)
    structure = torch.isin(ids, structure_ids(adapter)) & real
    assert structure.any()
    assert batch.special_mask[structure].all()
    expansion = adapter.image_text_mask(ids)
    assert not (expansion & ~real).any()
    assert batch.special_mask[expansion & ~batch.image_mask].all()  # the newlines inside included
    assert not (batch.text_mask & expansion).any()
    newline = vlm.tokenizer("\n", add_special_tokens=False).input_ids
    assert (torch.isin(ids, torch.tensor(newline)) & expansion).any(), "tile rows end with a newline"

    # Slots per image: (rows * cols tiles + the global image) x the slots of one tile.
    grids = tile_grids(new_family)
    assert grids == TILE_GRIDS[new_family.name] and len(set(grids)) == 3
    per_tile = image_seq_len(config)
    assert batch.image_mask.sum(-1).tolist() == [(r * c + 1) * per_tile for r, c in grids]
    assert [len(item[0]) for item in batch.image_slots] == [(r * c + 1) * per_tile for r, c in grids]

    # HF's own modality ids: Idefics3's mark the whole expansion, SmolVLM's the slots only.
    hf = new_family.processor(
        images=[[image] for image in family_images()],
        text=batch.prompts,
        return_tensors="pt",
        padding=True,
        padding_side=padding_side,
        return_mm_token_type_ids=True,
    )
    assert torch.equal(hf["input_ids"], ids)
    hf_image = hf["mm_token_type_ids"] == 1
    if new_family.name == "idefics3":
        assert torch.equal(hf_image, expansion)
        assert (hf_image & ~batch.image_mask).sum() > 0
    else:
        assert torch.equal(hf_image, batch.image_mask)


@FAMILIES
def test_layout_tiles_and_shuffled_grid_match_hf(new_family):
    """Tile 0 is the global image (its block comes last), tiles 1.. the crops row-major as
    ``<row_i_col_j>`` names them; each tile's slots row-major on its pixel-shuffled grid. Checked
    against HF: each tile's slots hold what HF's ``get_image_features`` gives for that tile's
    pixels alone, and the shuffle puts patch block (row, col) at the slot the layout says."""
    vlm, model = new_family.vlm, new_family.reference.model
    config = new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    _, cache = vlm.run_with_cache(batch, names_filter="hook_visual_prefix")
    prefix = cache["hook_visual_prefix"]
    per_tile = image_seq_len(config)
    side = int(per_tile**0.5)
    tokenizer = vlm.tokenizer
    start = 0
    for item, (rows, cols) in enumerate(tile_grids(new_family)):
        (slots,) = batch.image_slots[item]
        grid = slots.grid
        tiles = grid[:, 0].view(-1, per_tile)[:, 0].tolist()
        assert tiles == [*range(1, rows * cols + 1), 0]
        k = torch.arange(per_tile)
        for t in range(rows * cols + 1):
            assert torch.equal(
                grid[t * per_tile : (t + 1) * per_tile, 1:], torch.stack([k // side, k % side], -1)
            )
        # the marker before each tile's slots names the tile
        ids = batch.input_ids[item][batch.attention_mask[item].bool()]
        run_starts = [p for p in range(1, len(ids)) if ids[p] == config.image_token_id != ids[p - 1]]
        markers = tokenizer.convert_ids_to_tokens([int(ids[p - 1]) for p in run_starts])
        assert markers == [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)] + [
            "<global-img>"
        ]
        # frame f of the image's pixels: crop (f // cols, f % cols), then the global image
        pixels = batch.pixel_values[item : item + 1]
        mask = batch.inputs["pixel_attention_mask"][item : item + 1]
        image_prefix = prefix[start : start + len(slots)]
        for frame in range(rows * cols + 1):
            alone = model.get_image_features(pixels[:, frame : frame + 1], mask[:, frame : frame + 1])
            expected_tile = frame + 1 if frame < rows * cols else 0
            assert torch.allclose(
                image_prefix[grid[:, 0] == expected_tile], alone.pooler_output[0], atol=1e-6
            )
        start += len(slots)
    assert start == prefix.shape[0]

    # HF's pixel shuffle on index-coded patches: slot (row, col) covers the scale x scale patch block
    scale, patches = config.scale_factor, side * config.scale_factor
    p = torch.arange(patches * patches)
    coded = torch.stack([p // patches, p % patches], -1).float()[None]
    shuffled = model.connector.pixel_shuffle(coded, scale)[0].view(per_tile, -1, 2).long()
    for slot, (_, row, col) in enumerate(batch.image_slots[0][0].grid[:per_tile].tolist()):
        assert set(map(tuple, shuffled[slot].tolist())) == {
            (scale * row + i, scale * col + j) for i in range(scale) for j in range(scale)
        }


@FAMILIES
def test_pixel_rows_are_per_image(new_family):
    """The processor's ``pixel_values`` hold one item per row (all its images' tiles); the batch holds
    one image per row, which HF reads the same (logits equal), so items with several images select."""
    vlm, reference = new_family.vlm, new_family.reference
    images = family_images()
    batch = vlm.prepare([[images[0], images[1]], [images[2]]], ["Describe both.", "cat"], padding_side="left")
    grids = tile_grids(new_family)
    tiles = [r * c + 1 for r, c in grids]
    assert batch.pixel_values.shape[:2] == (3, max(tiles))
    assert batch.inputs["pixel_attention_mask"].shape[:2] == (3, max(tiles))
    present = batch.inputs["pixel_attention_mask"].flatten(2).any(-1).sum(-1)
    assert present.tolist() == tiles
    assert [len(item) for item in batch.image_slots] == [2, 1]
    raw = new_family.processor(
        images=[[images[0], images[1]], [images[2]]],
        text=batch.prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
    )
    assert raw["pixel_values"].shape[:2] == (2, tiles[0] + tiles[1])
    real = batch.attention_mask.bool()
    per_image = reference(**hf_forward_inputs(new_family, batch)).logits
    per_item = reference(**raw, position_ids=batch.position_ids).logits
    assert (per_image - per_item)[real].abs().max() <= 1e-6
    ours = vlm(batch)
    assert (ours - per_image)[real].abs().max() <= 1e-5
    for i in range(2):
        sub = batch.select([i])
        sub_real = sub.attention_mask[0].bool()
        assert (vlm(sub)[0][sub_real] - ours[i][real[i]]).abs().max() <= 1e-5
    # raw processor output (one item per row) is laid out per image too, and re-laying is a no-op
    from_raw = build_batch(vlm.adapter, raw)
    assert torch.equal(from_raw.pixel_values, batch.pixel_values)
    again = build_batch(vlm.adapter, dict(batch.inputs))
    assert torch.equal(again.pixel_values, batch.pixel_values)
    assert torch.equal(again.image_mask, batch.image_mask)


@FAMILIES
def test_an_all_zero_tile_is_dropped_as_hf_drops_it(new_family):
    """HF's ``get_image_features`` drops every tile whose pixels are all 0 (meant for padding tiles);
    a real tile that is all 0 goes too. We run HF's function, so we drop it too, and then refuse, as HF
    does, the images' fewer features than slots."""
    vlm, reference = new_family.vlm, new_family.reference
    batch = vlm.prepare(family_images(), PROMPTS)
    per_tile = image_seq_len(reference.config)
    pixels = batch.pixel_values.clone()
    pixels[0, 1] = 0  # the second crop of the first image: a real tile
    inputs = {**batch.inputs, "pixel_values": pixels}
    features = reference.model.get_image_features(pixels, batch.inputs["pixel_attention_mask"]).pooler_output
    assert sum(len(f) for f in features) == int(batch.image_mask.sum()) - per_tile
    with pytest.raises(ValueError, match="do not match"):
        reference(**inputs, position_ids=batch.position_ids)
    with pytest.raises(ImageCountError, match="visual tokens"):
        vlm(inputs)


@FAMILIES
def test_language_model_is_a_llama_view_of_the_text_model(new_family):
    vlm, hf_model = new_family.vlm, new_family.vlm.hf_model
    assert hf_model.config.get_text_config().model_type == "llama"
    view = vlm.adapter.language_model()
    assert type(view).__name__ == "LlamaForCausalLM"
    assert view.model is hf_model.model.text_model and view.lm_head is hf_model.lm_head
    assert "pixel_attention_mask" in vlm.adapter.vision_input_names


@pytest.mark.skipif(importlib.util.find_spec("num2words") is not None, reason="num2words is installed")
def test_smolvlm_processor_builds_without_num2words():
    """transformers' SmolVLMProcessor refuses to exist without ``num2words`` (used for video prompts
    only); the adapter module's stand-in lets image prompts through and names the package for video."""
    assert processing_smolvlm.num2words is not None
    with pytest.raises(ImportError, match="pip install num2words"):
        processing_smolvlm.num2words(3)


@FAMILIES
def test_structure_tokens_are_special_in_raw_processor_output(new_family):
    """A batch built from the processor's output alone (no instruction spans): the structure tokens
    and newlines of each image's text are still special, never inferred text."""
    vlm = new_family.vlm
    prepared = vlm.prepare(family_images(), PROMPTS, padding_side="right")
    raw = new_family.processor(
        images=[[image] for image in family_images()],
        text=prepared.prompts,
        return_tensors="pt",
        padding=True,
        padding_side="right",
    )
    batch = build_batch(vlm.adapter, raw)
    assert torch.equal(batch.image_mask, prepared.image_mask)
    image_text = vlm.adapter.image_text_mask(batch.input_ids)
    assert batch.special_mask[image_text & ~batch.image_mask].all()
    assert not (batch.text_mask & prepared.special_mask & image_text).any()
