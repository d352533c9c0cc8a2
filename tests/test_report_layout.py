"""Saliency drawn on the image's own token layout: a planted salient token lands on its cell, for a
non-square grid, for tiles, and end to end from a tiled model's run."""

from __future__ import annotations

import numpy as np
import pytest

from hooked_vllm.analysis import collect
from hooked_vllm.report.figures import attention_by_pair, lens_convergence, saliency_maps, tile_mosaic
from hooked_vllm.runs.datasets import DatasetItem
from hooked_vllm.runs.phase_diagram import aggregate, batch_rows
from tests.conftest import Family, family_images


def test_a_planted_token_lands_on_its_cell_in_a_non_square_grid():
    rows, cols = 3, 6  # Qwen's 24 x 48 image: 3 x 6 merged patches, row-major
    grid = [(0, 0, k // cols, k % cols) for k in range(rows * cols)]
    values = np.zeros(rows * cols)
    values[2 * cols + 4] = 7.0
    z, where = tile_mosaic(values, grid)
    assert z.shape == (rows, cols)
    assert z[2, 4] == 7.0 and np.nansum(z) == 7.0
    assert where[2, 4].tolist() == [0, 0, 2, 4]


def test_tiles_sit_side_by_side_and_a_planted_token_finds_its_tile():
    base = [(0, 0, r, c) for r in range(2) for c in range(2)]
    crop = [(0, 1, r, c) for r in range(3) for c in range(4)]
    second_image = [(1, 0, r, c) for r in range(2) for c in range(2)]
    grid = base + crop + second_image
    values = np.zeros(len(grid))
    values[len(base) + 1 * 4 + 3] = 5.0  # image 0, tile 1, row 1, col 3
    values[len(base) + len(crop) + 3] = 2.0  # image 1, tile 0, row 1, col 1
    z, where = tile_mosaic(values, grid)
    assert z.shape == (3, 2 + 1 + 4 + 1 + 2)
    assert z[1, 3 + 3] == 5.0 and where[1, 6].tolist() == [0, 1, 1, 3]
    assert z[1, 8 + 1] == 2.0 and where[1, 9].tolist() == [1, 0, 1, 1]
    assert np.isnan(z[2, 0]) and np.isnan(z[:, 2]).all()  # below the 2 x 2 base; the gap column


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory) -> Family:
    return Family("llava_next", tmp_path_factory.mktemp("llava-next-report"))


def test_the_report_draws_a_tiled_models_saliency_on_its_layout(llava_next, tmp_path):
    """One LLaVA-NeXT item (base view + 2 x 2 crops + row newlines): the figure's cell for each image
    token holds that token's saliency, found through the batch's own layout."""
    vlm = llava_next.vlm
    image = family_images()[2]
    image.save(tmp_path / "image.png")
    item = DatasetItem("item-0", tmp_path / "image.png", "Describe the image.")
    batch = vlm.prepare([image], [item.instruction])
    analysis = collect(vlm, batch)
    rows, sums = batch_rows(vlm, [item], analysis, batch)
    aggregates = aggregate(rows, sums)
    slots = batch.image_slots[0][0]
    patches = slots.grid[slots.is_patch]
    assert len({tile for tile, _, _ in patches.tolist()}) > 1, "the image must be tiled"
    figure = saliency_maps(aggregates, "saliency_last")
    saliency = np.asarray(aggregates["saliency_last"])
    assert len(figure.data) == saliency.shape[0]  # every layer, behind the slider
    for layer, panel in enumerate(figure.data):
        z, where = np.asarray(panel.z, dtype=float), np.asarray(panel.customdata)
        for k, (tile, row, col) in enumerate(patches.tolist()):
            cell = np.argwhere((where == [0, tile, row, col]).all(-1))
            assert len(cell) == 1
            assert z[tuple(cell[0])] == pytest.approx(saliency[layer, k])


def test_attention_figures_number_layers_by_block_and_the_lens_axes_start_at_zero():
    """Layer l of an attention figure is block l (``cache["pattern", l]``): the x axis of the
    attention-by-pair figure and the saliency slider run 0..L-1, and the slider's step "l" shows
    row l of the aggregates. The logit lens's two y axes both start at 0."""
    n_layers = 3
    saliency = np.arange(n_layers * 4, dtype=float).reshape(n_layers, 4)  # a 2 x 2 grid per layer
    aggregates = {
        "n_layers": n_layers,
        "norm_attention": {"text<-image": {"mean": [1.0, 2.0, 3.0]}},
        "weight_attention": {"text<-image": {"mean": [0.1, 0.2, 0.3]}},
        "saliency_last": saliency.tolist(),
        "logit_lens": {"kl_to_final": {"mean": [3.0, 1.0, 0.5, 0.0]}, "top1_is_final": [0.25, 0.5, 1, 1]},
    }
    figure = attention_by_pair(aggregates)
    assert [list(trace.x) for trace in figure.data] == [[0, 1, 2]] * 2
    assert list(figure.data[0].y) == [1.0, 2.0, 3.0]  # block 0's value at layer 0
    figure = saliency_maps(aggregates, "saliency_last")
    steps = figure.layout.sliders[0].steps
    assert [step.label for step in steps] == ["0", "1", "2"]
    for layer, step in enumerate(steps):
        shown = [trace for trace, visible in zip(figure.data, step.args[0]["visible"]) if visible]
        assert len(shown) == 1 and shown[0].name == f"layer {layer}"
        np.testing.assert_array_equal(np.asarray(shown[0].z, dtype=float).flatten(), saliency[layer])
    figure = lens_convergence(aggregates)
    assert figure.layout.yaxis.range[0] == 0 and figure.layout.yaxis2.range[0] == 0
    assert figure.layout.yaxis.range[1] >= 3.0 and figure.layout.yaxis2.range[1] >= 1.0
