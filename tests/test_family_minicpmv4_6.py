"""MiniCPM-V 4.6: a source view plus a grid of slices per image, NaViT-packed pixels, structure tokens
around the slots, Qwen3.5's hybrid language model. The shared bar (tests/test_families.py,
tests/test_family_lenses.py) runs on the tiny model; this file checks what is particular to it: which
positions are image slots, the slice layout (planted: a pixel change reaches its own slot only),
selecting images out of the packed ``pixel_values``, and refusals."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm import HookedVLM, UnsupportedModelError
from hooked_vllm.errors import BatchFormatError
from hooked_vllm.tiny_models.minicpmv4_6 import MINICPM_TOKENS, tiny_minicpmv4_6
from tests.conftest import family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
FAMILY = pytest.mark.parametrize("new_family", ["minicpmv4_6"], indirect=True)
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])
#: slice grids (rows, cols) of the test images 48x24, 24x48, 40x40 (w x h), from HF's image processor
SLICE_GRIDS = [(1, 2), (2, 1), (2, 1)]


def image_processor_output(new_family):
    """HF's image processor on the test images: packed pixels, per-slice sizes, grids."""
    return new_family.processor.image_processor(family_images(), return_tensors="pt")


def structure_ids(tokenizer):
    names = [token for key, token in MINICPM_TOKENS.items() if key not in ("image_token", "video_token")]
    return torch.tensor(tokenizer.convert_tokens_to_ids(names))


@FAMILY
@SIDES
def test_image_mask_is_exactly_the_image_slot_positions(new_family, padding_side):
    """Only the ``<unk_image>`` slots are image; ``<image_id>N</image_id>`` (its digits included),
    ``<image>``, ``</image>``, ``<slice>``, ``</slice>`` and the newlines between slice rows are
    special; the instruction alone is text."""
    vlm, config = new_family.vlm, new_family.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    tokenizer = vlm.tokenizer

    assert torch.equal(batch.image_mask, (ids == config.image_token_id) & real)
    structure = torch.isin(ids, structure_ids(tokenizer)) & real
    assert structure.sum(-1).tolist() == [4 + 2 * r * c for r, c in SLICE_GRIDS]
    assert batch.special_mask[structure].all()
    expansion = vlm.adapter.image_text_mask(ids) & real
    assert batch.special_mask[expansion & ~batch.image_mask].all()
    assert not (batch.text_mask & expansion).any()
    # the image id's digit and the newline between two rows of slices are inside the expansion
    digit, newline = (tokenizer(t, add_special_tokens=False).input_ids for t in ("0", "\n"))
    assert (torch.isin(ids, torch.tensor(digit)) & expansion).sum() == 3
    rows_of_slices = [r for r, _ in SLICE_GRIDS]
    assert (torch.isin(ids, torch.tensor(newline)) & expansion).sum(-1).tolist() == [
        r - 1 for r in rows_of_slices
    ]
    for item, instruction in enumerate(PROMPTS):
        text = tokenizer.decode(ids[item][batch.text_mask[item]])
        assert text.strip() == instruction

    # slots per image: the source view's and each slice's h * w / 16 (HF's target_sizes)
    processed = image_processor_output(new_family)
    assert [list(g) for g in processed["grids"]] == [list(g) for g in SLICE_GRIDS]
    slots = (processed["target_sizes"].prod(-1) // 16).tolist()
    firsts = [0, 3, 6]  # view + 2 slices each
    assert processed["num_patches_per_image"] == [3, 3, 3]
    assert batch.image_mask.sum(-1).tolist() == [sum(slots[f : f + 3]) for f in firsts]


@FAMILY
def test_layouts_name_the_view_and_each_slice(new_family):
    """Tile 0 is the source view, tiles 1.. the slices in row-major order, each slot at its cell of
    that view's or slice's ``h/4 x w/4`` grid."""
    batch = new_family.vlm.prepare(family_images(), PROMPTS)
    sizes = (image_processor_output(new_family)["target_sizes"] // 4).tolist()
    for item in range(3):
        (layout,) = batch.image_slots[item]
        for tile in range(3):
            rows, cols = sizes[3 * item + tile]
            cells = layout.grid[layout.grid[:, 0] == tile]
            expected = [(tile, k // cols, k % cols) for k in range(rows * cols)]
            assert [tuple(c) for c in cells.tolist()] == expected


def _local_vision(seed: int, tmp_path):
    """The tiny model with every vision attention's output projection zeroed: each slot then sees only
    the 4x4 patches it merges (MLPs, norms and merges act per patch or per 2x2 window)."""
    hf_model, processor = tiny_minicpmv4_6(seed=seed, directory=tmp_path)
    tower = hf_model.model.vision_tower
    for attention in [*(layer.self_attn for layer in tower.encoder.layers), tower.vit_merger.self_attn]:
        torch.nn.init.zeros_(attention.out_proj.weight)
        torch.nn.init.zeros_(attention.out_proj.bias)
    return HookedVLM.from_hf(hf_model, processor)


def test_a_planted_pixel_change_reaches_exactly_its_slot(tmp_path):
    """Change one patch of one slice in the packed ``pixel_values``: of the whole visual prefix, only
    the slot the layout puts at that slice's cell (patch row // 4, patch col // 4) changes."""
    vlm = _local_vision(0, tmp_path)
    batch = vlm.prepare(family_images(), PROMPTS)
    inputs = dict(batch.inputs)
    sizes = inputs["target_sizes"].tolist()
    patch = inputs["pixel_values"].shape[-2]
    slot_of = [(i, tuple(cell)) for i, item in enumerate(batch.image_slots) for cell in item[0].grid.tolist()]
    base = vlm.adapter.visual_prefix(inputs)
    column = 0
    for unit, (h, w) in enumerate(sizes):
        item, tile = unit // 3, unit % 3
        for row, col in [(0, 0), (h - 1, w - 1), (h // 2, w - 1)]:
            planted = inputs["pixel_values"].clone()
            start = column + (row * w + col) * patch
            planted[..., start : start + patch] += 1.0
            changed = (vlm.adapter.visual_prefix({**inputs, "pixel_values": planted}) - base).abs().amax(-1)
            hit = changed.nonzero().flatten().tolist()
            assert len(hit) == 1, (unit, row, col, hit)
            assert slot_of[hit[0]] == (item, (tile, row // 4, col // 4))
        column += h * w * patch


@FAMILY
@SIDES
def test_selecting_items_takes_their_packed_pixels(new_family, padding_side):
    """A sub-batch's ``pixel_values`` and ``target_sizes`` are exactly what the processor gives its
    items alone (images selected along the packed last dimension), and its logits equal HF's there."""
    vlm = new_family.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    for picked in ([1], [0, 2], [2, 1]):
        sub = batch.select(picked)
        alone = vlm.prepare([family_images()[i] for i in picked], [PROMPTS[i] for i in picked])
        assert torch.equal(sub.inputs["target_sizes"], alone.inputs["target_sizes"])
        assert torch.equal(sub.inputs["pixel_values"], alone.inputs["pixel_values"])
    sub = batch.select([2, 0])
    reference = new_family.reference(**sub.inputs, position_ids=sub.position_ids).logits
    real = sub.attention_mask.bool()
    assert (vlm(sub) - reference)[real].abs().max() <= 1e-5


@FAMILY
def test_mismatched_target_sizes_are_refused_in_one_line(new_family):
    vlm = new_family.vlm
    inputs = dict(vlm.prepare(family_images(), PROMPTS).inputs)
    inputs["target_sizes"] = inputs["target_sizes"][:-1]
    with pytest.raises(BatchFormatError, match="target_sizes has 8 rows") as error:
        vlm(inputs)
    assert "\n" not in str(error.value)


def test_4x_downsampling_is_refused(tmp_path):
    """``"4x"`` (slots of h/2 x w/2) was never measured: refused at load (model) or run (processor)."""
    hf_model, processor = tiny_minicpmv4_6(directory=tmp_path)
    hf_model.config.downsample_mode = "4x"
    with pytest.raises(UnsupportedModelError, match="downsample_mode"):
        HookedVLM.from_hf(hf_model, processor)
    hf_model.config.downsample_mode = "16x"
    processor.image_processor.downsample_mode = "4x"
    vlm = HookedVLM.from_hf(hf_model, processor)
    with pytest.raises(UnsupportedModelError, match="downsample_mode"):
        vlm(vlm.prepare(family_images()[:1], PROMPTS[:1]))
