"""LFM2-VL: a hybrid language model (gated short convolutions between attention layers) fed image
tiles plus a thumbnail, each tile after a row/column marker. What only this family has: which layers
have a pattern, the convolution's padding (HF zeroes it; our hooks see it), the tile layout from the
markers and ``spatial_shapes``, and the decomposition's convolution terms."""

from __future__ import annotations

import pytest
import torch

from hooked_vllm.errors import BatchFormatError
from tests.conftest import Family, family_images

PROMPTS = ["Describe the image.", "What colour is the square in the picture?", "cat"]
TOL = 1e-5
SIDES = pytest.mark.parametrize("padding_side", ["left", "right"])


@pytest.fixture(scope="module")
def lfm2_vl(tmp_path_factory) -> Family:
    return Family("lfm2_vl", tmp_path_factory.mktemp("lfm2-vl"))


def test_layers_with_and_without_an_attention_pattern(lfm2_vl):
    vlm = lfm2_vl.vlm
    assert lfm2_vl.reference.config.text_config.layer_types == ["conv", "full_attention"] * 2
    assert vlm.adapter.attention_layers == (1, 3) and vlm.adapter.decodes_left_padded
    names = vlm.hook_dict
    for layer in range(vlm.cfg.n_layers):
        has_attention = layer in vlm.adapter.attention_layers
        assert (f"blocks.{layer}.attn.hook_pattern" in names) == has_attention
        assert (f"blocks.{layer}.conv.hook_out" in names) == (not has_attention)


@SIDES
def test_image_mask_is_the_slots_and_the_markers_are_special(lfm2_vl, padding_side):
    vlm, config = lfm2_vl.vlm, lfm2_vl.reference.config
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    ids, real = batch.input_ids, batch.attention_mask.bool()
    assert torch.equal(batch.image_mask, ids == config.image_token_id)
    # 48x24 and 24x48: one tile of 3x6 / 6x3 slots; 40x40: 2x2 tiles of 3x3 and a 4x4 thumbnail
    assert batch.image_mask.sum(-1).tolist() == [18, 18, 52]
    markers = batch.special_mask & vlm.adapter.image_text_mask(ids) & real
    tokens = [vlm.tokenizer.convert_ids_to_tokens(ids[i][markers[i]].tolist()) for i in range(len(batch))]
    assert tokens[0] == tokens[1] == ["<|image_start|>", "<|image_end|>"]
    assert tokens[2] == [
        "<|image_start|>",
        "<|img_row_1_col_1|>",
        "<|img_row_1_col_2|>",
        "<|img_row_2_col_1|>",
        "<|img_row_2_col_2|>",
        "<|img_thumbnail|>",
        "<|image_end|>",
    ]
    assert not (batch.text_mask & vlm.adapter.image_text_mask(ids)).any()


def test_tile_layout_follows_the_markers_and_spatial_shapes(lfm2_vl):
    """Tile 0 is the whole image (the one tile, or the thumbnail, which comes last), tiles 1-4 the
    crops at <|img_row_i_col_j|> in row-major order; each tile's slots row-major on its unshuffled
    grid (``spatial_shapes // 2``)."""
    vlm = lfm2_vl.vlm
    batch = vlm.prepare(family_images(), PROMPTS)
    assert vlm.adapter.image_input_rows(batch.inputs)["pixel_values"] == [1, 1, 5]
    (wide,), (tall,), (tiled,) = batch.image_slots
    assert wide.patch_index()[0].shape == (3, 6) and tall.patch_index()[0].shape == (6, 3)
    index = tiled.patch_index()
    assert sorted(index) == [0, 1, 2, 3, 4]
    assert index[0].shape == (4, 4) and all(index[t].shape == (3, 3) for t in (1, 2, 3, 4))
    # sequence order: crops 1..4 (9 slots each, row-major), then the thumbnail
    assert torch.equal(index[1].flatten(), torch.arange(9))
    assert torch.equal(index[4].flatten(), torch.arange(27, 36))
    assert torch.equal(index[0].flatten(), torch.arange(36, 52))
    shapes = batch.inputs["spatial_shapes"].tolist()
    assert shapes == [[6, 12], [12, 6], [6, 6], [6, 6], [6, 6], [6, 6], [8, 8]]


def test_padding_never_enters_the_convolution(lfm2_vl):
    """HF zeroes padded positions before each convolution: junk written into the padding of the
    conv's input (``blocks.0.conv.hook_in``) changes no real position; the same junk at one real
    position changes the positions after it (the convolution mixes them)."""
    vlm = lfm2_vl.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side="left")
    real = batch.attention_mask.bool()
    clean = vlm(batch)

    def write(where):
        def hook(x, hook):
            return torch.where(where[..., None].to(x.device), torch.full_like(x, 7.0), x)

        return [("blocks.0.conv.hook_in", hook)]

    padded = vlm.run_with_hooks(batch, fwd_hooks=write(~real))
    assert (padded - clean)[real].abs().max() <= TOL
    one = torch.zeros_like(real)
    one[0, batch.last_positions[0] - 1] = True
    moved = vlm.run_with_hooks(batch, fwd_hooks=write(one))
    assert (moved - clean)[0, batch.last_positions[0]].abs().max() > 1e-3


@SIDES
def test_decomposition_names_the_convolutions(lfm2_vl, padding_side):
    vlm = lfm2_vl.vlm
    batch = vlm.prepare(family_images(), PROMPTS, padding_side=padding_side)
    real = batch.attention_mask.bool()
    _, cache = vlm.run_with_cache(batch)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == [
        "embed",
        "0_conv_out",
        "0_mlp_out",
        "1_attn_out",
        "1_mlp_out",
        "2_conv_out",
        "2_mlp_out",
        "3_attn_out",
        "3_mlp_out",
    ]
    assert (parts.sum(0) - cache["blocks.3.hook_resid_post"])[real].abs().max() <= TOL
    assert torch.equal(parts[1], cache["blocks.0.conv.hook_out"])


def test_inputs_without_image_markers_are_refused(lfm2_vl):
    vlm, processor = lfm2_vl.vlm, lfm2_vl.processor
    prompts = [f"<image>{prompt}" for prompt in PROMPTS]
    images = [[image] for image in family_images()]
    inputs = processor(
        images=images, text=prompts, return_tensors="pt", padding=True, use_image_special_tokens=False
    )
    with pytest.raises(BatchFormatError, match="use_image_special_tokens=True"):
        vlm(dict(inputs))
