"""The synthetic task's ground truth agrees with the rendered pixels (the demo model's tests and
the patching/saliency studies rely on it)."""

from __future__ import annotations

import numpy as np

from hooked_vllm.demo import shapes


def test_patch_labels_name_what_each_rendered_cell_holds():
    rng = np.random.default_rng(7)
    colours, kinds = list(shapes.COLOURS), shapes.SHAPES
    for _ in range(50):
        scene = shapes.random_scene(rng)
        pixels = np.asarray(shapes.render(scene)).astype(int)
        colour_labels, shape_labels = shapes.patch_labels(scene)
        for cell, (colour_label, shape_label) in enumerate(zip(colour_labels, shape_labels)):
            row, col = divmod(cell, shapes.GRID)
            block = pixels[
                row * shapes.CELL : (row + 1) * shapes.CELL, col * shapes.CELL : (col + 1) * shapes.CELL
            ]
            painted = (block != shapes.BACKGROUND).any(-1)
            assert (colour_label == 0) == (shape_label == 0)
            if colour_label == 0:
                assert not painted.any()
                continue
            colour = colours[colour_label - 1]
            # The cell is painted with that colour (anti-aliasing aside) ...
            exact = (block == shapes.COLOURS[colour]).all(-1)
            assert exact.sum() >= 0.8 * painted.sum() > 0
            # ... in the shape named: a square fills its box, a circle ~pi/4 of it, a triangle ~1/2.
            kind = kinds[shape_label - 1]
            fill = exact.sum() / (2 * scene[0].size + 1) ** 2 if len(scene) == 1 else None
            if fill is not None:
                expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}[kind]
                assert abs(fill - expected) < 0.15


def test_captions_name_each_shape_with_its_colour():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = shapes.random_scene(rng)
        ordered = sorted(scene, key=shapes.patch_of)
        assert shapes.caption(scene).split(" and ") == [f"a {s.colour} {s.kind}" for s in ordered]
        pairs = [part.split() for part in shapes.colour_caption(scene).split(" and ")]
        assert [tuple(p) for p in pairs] == [(s.kind, s.colour) for s in ordered]
        # With an rng (as in training) the order is drawn, the pairs are the scene's.
        shuffled = [part.split() for part in shapes.colour_caption(scene, rng).split(" and ")]
        assert sorted(map(tuple, shuffled)) == sorted((s.kind, s.colour) for s in scene)
        assert set(shapes.caption(scene).split()) <= set(shapes.vocabulary())
        assert set(shapes.colour_caption(scene).split()) <= set(shapes.vocabulary())
