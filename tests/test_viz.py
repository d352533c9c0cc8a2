"""Per-token results drawn on the image are registered to it: a planted salient patch lands on its
cell, for a non-square grid and for a tiled layout. Patching heatmaps and attention views draw what
they are given: a planted cell, head pattern or patch is where it was planted."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from hooked_vllm.adapters.base import ImageSlots
from hooked_vllm.analysis import collect
from hooked_vllm.interventions.patching import PatchingResult
from hooked_vllm.report.viz import (
    MODALITY_COLOURS,
    attention_grids,
    on_image,
    position_modalities,
    show_attention,
    show_patching,
    show_saliency,
    tile_grids,
)
from tests.conftest import Family, family_images

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def axes_labelled(fig, label):
    """The one axes (or inset: the modality strips) of ``fig`` labelled ``label``."""
    every = [*fig.axes, *(child for ax in fig.axes for child in ax.child_axes)]
    found = [ax for ax in every if ax.get_label() == label]
    assert len(found) == 1, [ax.get_label() for ax in every]
    return found[0]


def drawn(ax, k=0) -> np.ndarray:
    return np.asarray(ax.get_images()[k].get_array())


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
    from hooked_vllm.report.viz import lens_token_grids, show_lens_grid

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


# ---------------------------------------------------------------- show_patching
def test_a_planted_patching_cell_is_the_heatmaps_extreme_at_its_layer_and_group():
    effects = torch.full((4, 3), -2.0)
    effects[2, 1] = 3.0  # patching the text at layer 6 restores the clean metric
    result = PatchingResult(effects, [0, 3, 6, 9], ["image", "text", "last"], 3.0, -2.0, "resid_post")
    ax = axes_labelled(show_patching(result), "patching")
    shown = drawn(ax)
    assert np.array_equal(shown, effects.numpy())  # [layer, group], as stored
    assert np.unravel_index(np.argmax(shown), shown.shape) == (2, 1)
    low, high = ax.get_images()[0].get_clim()
    assert (low + high) / 2 == pytest.approx(-2.0)  # centred on the unpatched target: no effect
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "3", "6", "9"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image", "text", "last"]

    relative = drawn(axes_labelled(show_patching(result, relative=True), "patching"))
    assert relative[2, 1] == pytest.approx(1.0) and np.count_nonzero(relative) == 1


def test_a_layer_by_position_tensor_gets_token_labels_and_the_batchs_modalities(llava):
    vlm = llava.vlm
    batch = vlm.prepare(family_images()[:1], ["What colour?"])
    n_pos = batch.shape[1]
    k = int(batch.image_mask[0].nonzero()[3])  # an image position
    effect = torch.zeros(vlm.cfg.n_layers, n_pos)
    effect[1, k] = -4.0
    tokens = vlm.to_str_tokens(batch)
    fig = show_patching(effect, str_tokens=tokens, batch=batch, baseline=0.0)
    ax = axes_labelled(fig, "patching")
    shown = drawn(ax)
    assert np.array_equal(shown, effect.numpy())
    assert np.unravel_index(np.argmax(np.abs(shown)), shown.shape) == (1, k)
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    strip = drawn(axes_labelled(fig, "modality strip (top)"))[0]
    order = list(MODALITY_COLOURS)
    assert [order[int(c)] for c in strip] == position_modalities(batch, 0)
    assert order[int(strip[k])] == "image"
    with pytest.raises(ValueError, match="str_tokens"):
        show_patching(effect, str_tokens=tokens[:-1])


# ---------------------------------------------------------------- show_attention
@pytest.fixture(scope="module")
def padded_batch(llava_next):
    """Two items of different lengths (one padded): a non-square image and a tiled one."""
    images = family_images()
    return images, llava_next.vlm.prepare([images[0], images[2]], ["What colour?", "Describe the image."])


def planted_pattern(batch, n_heads=3, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n = batch.shape[1]
    return torch.rand(len(batch), n_heads, n, n, generator=generator)


def test_the_drawn_pattern_is_the_items_head_without_padding(llava_next, padded_batch):
    _, batch = padded_batch
    pattern = planted_pattern(batch)
    lengths = batch.attention_mask.sum(-1)
    item = int(lengths.argmin())  # the padded one
    assert lengths[item] < batch.shape[1]
    real = batch.attention_mask[item].bool()
    fig = show_attention(llava_next.vlm, pattern, batch, item=item, layer=1, head=2)
    ax = axes_labelled(fig, "pattern")
    assert np.array_equal(drawn(ax), pattern[item, 2][real][:, real].numpy())
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    tokens = llava_next.vlm.to_str_tokens(batch, index=item)
    assert ticks == [t for t, r in zip(tokens, real.tolist()) if r][:: int(np.ceil(int(real.sum()) / 64))]
    strip = drawn(axes_labelled(fig, "modality strip (left)"))[:, 0]
    assert [list(MODALITY_COLOURS)[int(c)] for c in strip] == position_modalities(batch, item)

    mean = axes_labelled(show_attention(llava_next.vlm, pattern, batch, item=item, layer=1), "pattern")
    assert np.allclose(drawn(mean), pattern[item].mean(0)[real][:, real].numpy())
    heads = show_attention(llava_next.vlm, pattern, batch, item=item, layer=1, per_head=True)
    for h in range(3):
        assert np.array_equal(
            drawn(axes_labelled(heads, f"head {h}")), pattern[item, h][real][:, real].numpy()
        )


def test_attention_from_a_query_lands_on_the_planted_patch_over_the_image_and_on_its_crop(
    llava_next, padded_batch
):
    images, batch = padded_batch
    item = 1  # the 40 x 40 image: base view + 2 x 2 crops
    slots = batch.image_slots[item][0]
    cells = slots.grid[slots.is_patch].tolist()
    positions = batch.image_mask[item].nonzero().flatten().tolist()
    query = int(batch.last_positions[item])
    base = next(i for i, (tile, _, _) in enumerate(cells) if tile == 0 and i > 2)
    crop = next(i for i, (tile, _, _) in enumerate(cells) if tile == 3)
    pattern = torch.zeros(len(batch), 2, batch.shape[1], batch.shape[1])
    pattern[item, 1, query, positions[base]] = 0.7
    pattern[item, 1, query, positions[crop]] = 0.3
    pattern[item, 0, query, positions[crop]] = 0.9  # another head: not drawn
    fig = show_attention(llava_next.vlm, pattern, batch, item=item, layer=0, head=1, image=images[2])

    tile, row, col = cells[base]
    overlay = drawn(axes_labelled(fig, "image tile 0"), 1)  # [0]: the picture, [1]: the attention
    grid = np.zeros_like(attention_grids(batch, item, pattern[item, 1, query])[0])
    grid[row, col] = 0.7
    assert overlay.shape == (40, 40)
    assert np.allclose(overlay, on_image(grid, images[2].size))
    tile, row, col = cells[crop]
    on_crop = drawn(axes_labelled(fig, f"image tile {tile}"))
    assert np.unravel_index(np.nanargmax(on_crop), on_crop.shape) == (row, col)
    assert on_crop[row, col] == pytest.approx(0.3) and np.nansum(on_crop) == pytest.approx(0.3)


def test_show_attention_reads_the_layers_pattern_from_a_cache(llava):
    vlm = llava.vlm
    images = family_images()
    batch = vlm.prepare(images[:2], ["What colour?", "Describe the image."])
    _, cache = vlm.run_with_cache(batch, names_filter=lambda name: name.endswith("hook_pattern"))
    fig = show_attention(vlm, cache, batch, item=0, layer=1, head=0, query=int(batch.last_positions[0]))
    real = batch.attention_mask[0].bool()
    assert np.allclose(drawn(axes_labelled(fig, "pattern")), cache["pattern", 1][0, 0][real][:, real].numpy())
    row = cache["pattern", 1][0, 0, int(batch.last_positions[0])]
    assert np.allclose(
        drawn(axes_labelled(fig, "image tile 0")),
        tile_grids(batch.image_slots[0][0], row[batch.image_mask[0]].numpy())[0],
    )
    _, no_patterns = vlm.run_with_cache(batch, names_filter="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="hook_pattern"):
        show_attention(vlm, no_patterns, batch, item=0, layer=1)


def test_show_saliency_lays_the_grid_over_the_part_the_model_saw(tmp_path):
    """LLaVA-1.5 keeps the centre 24 x 24 of a 48 x 24 image: the picture under the overlay is that
    square; InstructBLIP's queries are not regions: no picture under them."""
    wide = family_images()[0]
    llava = Family("llava", tmp_path / "llava").vlm
    batch = llava.prepare([wide], ["Describe."])
    figure = show_saliency(llava, batch, collect(llava, batch), 0, 0, image=wide)
    picture = figure.axes[0].images[0].get_array()
    assert picture.shape[:2] == (24, 24)
    np.testing.assert_array_equal(picture, np.asarray(wide)[:, 12:36])
    blip = Family("instructblip", tmp_path / "blip").vlm
    batch = blip.prepare([wide], ["Describe."])
    figure = show_saliency(blip, batch, collect(blip, batch), 0, 0, image=wide)
    assert len(figure.axes[0].images) == 1 and "not regions" in figure.axes[0].get_title()
