"""Per-token results drawn on the image are registered to it: a planted salient patch lands on its
cell, for a non-square grid and for a tiled layout."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from hooked_vllm.adapters.base import ImageSlots
from hooked_vllm.analysis import collect
from hooked_vllm.viz import on_image, show_saliency, tile_grids
from tests.conftest import Family, family_images

matplotlib.use("Agg")


def test_a_planted_patch_lands_on_its_region_of_a_non_square_image():
    slots = ImageSlots.rows_by_cols(3, 6)  # Qwen's 48 x 24 image: 3 x 6 merged patches
    values = np.zeros(18)
    values[2 * 6 + 4] = 1.0
    grid = tile_grids(slots, values)[0]
    heat = on_image(grid, (48, 24))  # (width, height)
    assert heat.shape == (24, 48)
    rows, cols = np.nonzero(heat)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 23, 32, 39)  # cell (2, 4) of 8 px


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory) -> Family:
    return Family("llava_next", tmp_path_factory.mktemp("llava-next-viz"))


def test_a_planted_patch_lands_on_its_tile_and_newlines_are_left_out(llava_next):
    vlm = llava_next.vlm
    batch = vlm.prepare(family_images()[2:], ["Describe the image."])  # 40 x 40: base + 2 x 2 crops
    slots = batch.image_slots[0][0]
    patches = slots.grid[slots.is_patch]
    assert int((~slots.is_patch).sum()) > 0, "the layout has newline slots"
    k = next(i for i, (tile, _, _) in enumerate(patches.tolist()) if tile == 3)
    tile, row, col = patches[k].tolist()
    values = np.zeros(len(patches))
    values[k] = 5.0
    grids = tile_grids(slots, values)
    assert sorted(grids) == [0, 1, 2, 3, 4]
    assert grids[tile][row, col] == 5.0
    assert np.nansum([np.nansum(g) for g in grids.values()]) == 5.0
    with pytest.raises(ValueError, match="image-patch tokens"):
        tile_grids(slots, np.zeros(len(slots)))  # newline slots are not values


def test_show_saliency_overlays_the_base_view_and_draws_the_crops(llava_next):
    vlm = llava_next.vlm
    image = family_images()[2]
    batch = vlm.prepare([image], ["Describe the image."])
    result = collect(vlm, batch)
    fig = show_saliency(vlm, batch, result, item=0, layer=1, image=image)
    slots = batch.image_slots[0][0]
    grids = tile_grids(slots, result.attention.image_saliency_from_last[1, 0].numpy())
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(grids)
    overlay = panels[0].get_images()[1].get_array()
    assert np.allclose(np.asarray(overlay), on_image(grids[0], image.size), equal_nan=True)
    assert np.allclose(np.asarray(panels[1].get_images()[0].get_array()), grids[1], equal_nan=True)


def test_lens_tokens_land_on_their_patches(llava_next):
    """Each patch's cell holds the logit lens's top-1 token at that patch's own position."""
    from hooked_vllm.viz import lens_token_grids, show_lens_grid

    vlm = llava_next.vlm
    image = family_images()[2]
    batch = vlm.prepare([image], ["Describe the image."])
    result = collect(vlm, batch, verbalize_images=True)
    _, cache = vlm.run_with_cache(batch, names_filter="blocks.1.hook_resid_post")
    top1 = vlm.unembed(vlm.ln_final(cache["blocks.1.hook_resid_post"])).argmax(-1)[0]  # layer 2
    grids = lens_token_grids(vlm, batch, result, item=0, layer=2)
    slots = batch.image_slots[0][0]
    positions = batch.image_mask[0].nonzero().flatten().tolist()
    for position, (tile, row, col) in zip(positions, slots.grid[slots.is_patch].tolist()):
        assert grids[tile][row, col] == vlm.tokenizer.decode([int(top1[position])])
    assert len(show_lens_grid(vlm, batch, result, item=0, layer=2).axes) == len(grids)
