"""The report in a real browser (headless Chromium, offline): it loads with no console error and no
network request, every figure has data, the explorer's layer slider and head selector redraw the
saliency map, a planted salient patch is drawn on its own cell of a non-square grid and of a
second tile, hovering names the cell and the readout follows every control, the picture keeps its
own colours under the default overlay, thumbnails show the whole picture, the model's answer is
shown, and the logit-lens figure's two axes share their zero. Layers are block indices (block l's
attention is layer l). Screenshots of the overview and of an item go to docs/screenshots/ (CI
artefacts)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hooked_vllm.cli import main
from hooked_vllm.report.explorer import ItemView
from hooked_vllm.report.html import write_report
from tests.browser import launch_browser, open_page

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
TOP, BOTTOM = (253, 231, 37), (68, 1, 84)  # viridis at 1 and at 0


@pytest.fixture(scope="module")
def browser():
    with launch_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    assert (
        main(["phase-diagram", "--model", "demo", "--out", str(out), "--no-progress", "--report-items", "4"])
        == 0
    )
    return out


def wait_for_item(page, index: int) -> None:
    page.wait_for_function(f"document.body.dataset.explorerReady === '{index}'")


def canvas_png(page, canvas_id: str) -> str:
    return page.evaluate(f"document.getElementById('{canvas_id}').toDataURL()")


def pixel(page, canvas_id: str, x: float, y: float) -> tuple[int, int, int]:
    return tuple(
        page.evaluate(
            f"""() => {{ const c = document.getElementById('{canvas_id}');
            return Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data.slice(0, 3)); }}"""
        )
    )


def set_range(page, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector, f"(el) => {{ el.value = {value}; el.dispatchEvent(new Event('input')); }}"
    )


def test_the_report_opens_offline_and_every_figure_has_data(browser, run_dir):
    with open_page(run_dir / "report.html", browser, viewport=(1280, 1100)) as view:
        page = view.page
        wait_for_item(page, 0)
        plots = page.evaluate(
            """() => {
                const types = {f8: Float64Array, f4: Float32Array, i4: Int32Array, i2: Int16Array,
                    i1: Int8Array, u4: Uint32Array, u2: Uint16Array, u1: Uint8Array};
                const flat = (a) => Array.from(a).flatMap(
                    (v) => (v !== null && typeof v === "object" ? values(v) : [v]));
                // plotly.py ships numpy arrays as {dtype, bdata}; hidden traces stay encoded
                const values = (a) => (a.bdata ? Array.from(new types[a.dtype](
                    Uint8Array.from(atob(a.bdata), (c) => c.charCodeAt(0)).buffer)) : flat(a));
                return [...document.querySelectorAll('.js-plotly-plot')].map((gd) => gd.data.map(
                    (t) => values([t.z, t.y, t.cells && t.cells.values].filter(Boolean))
                        .filter((v) => Number.isFinite(v)).length));
            }"""
        )
        assert len(plots) == 5  # phase diagram, attention, saliency x 2, logit lens
        assert all(len(traces) > 0 and all(n > 0 for n in traces) for traces in plots), plots
        for canvas in page.query_selector_all("#saliency-tiles canvas, #lens-tiles canvas"):
            colours, values = canvas.evaluate(
                """(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    const colours = new Set();
                    for (let k = 0; k < d.length; k += 4) colours.add(d.slice(k, k + 4).join());
                    return [colours.size, new Set(d).size]; }"""
            )
            assert colours > 3  # drawn, not blank: a picture with its shapes, words or outline
            if canvas.get_attribute("id").endswith("-heat"):
                assert values > 10  # a heat map: the colour scale's many shades
        # the attention slider runs over blocks 0..L-1, the lens table over streams 0..L (+ a header)
        assert page.locator("#lens-last tr").count() == page.eval_on_selector("#layer", "(el) => +el.max") + 3
        view.screenshot(SCREENSHOTS / "report-overview.png", full_page=False)
        view.assert_clean()


def test_the_layer_slider_and_head_selector_redraw_the_overlay(browser, run_dir):
    with open_page(run_dir / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        page.click('#item-index a[data-item="1"]')
        wait_for_item(page, 1)
        canvas = "sal-1-0-heat"  # the heat map beside the picture
        page.locator("#explorer-heading").scroll_into_view_if_needed()
        assert page.text_content("#layer-label") == "layer 0"  # block 0's attention
        first = canvas_png(page, canvas)
        page.locator("#layer").focus()
        page.keyboard.press("ArrowRight")  # a real key press on the slider
        assert page.get_attribute(f"#{canvas}", "data-frame") == "text/0/1"
        assert page.text_content("#layer-label") == "layer 1"
        second = canvas_png(page, canvas)
        assert second != first
        page.select_option("#head", "1")  # head 0
        assert page.get_attribute(f"#{canvas}", "data-frame") == "text/1/1"
        assert canvas_png(page, canvas) != second
        page.eval_on_selector("#item-title", "(el) => el.scrollIntoView()")  # the item at the top
        view.screenshot(SCREENSHOTS / "report-item.png", full_page=False)
        view.assert_clean()


class _Tokenizer:
    def decode(self, ids):
        return f"t{ids[0]}"


def _grey_thumbnail(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def planted_item() -> ItemView:
    """A 3 x 6 grid (a 2:1 image, as Qwen's 48 x 24) plus a 2 x 2 second tile. From the instruction,
    all heads: at layer 0 (block 0) patches 16 (tile 0, row 2, col 4) and 20 (tile 1, row 1, col 0)
    are salient, at layer 1 patch 0; head 0 at layer 0: patch 5; from the last position, all heads
    at layer 0: patch 3 (so a wrong head or source index draws the wrong cell)."""
    tiles = [
        {"tile": 0, "rows": 3, "cols": 6, "index": list(range(18))},
        {"tile": 1, "rows": 2, "cols": 2, "index": list(range(18, 22))},
    ]
    saliency = np.zeros((2, 3, 22))
    saliency[0, 0, [16, 20]] = 1.0
    saliency[1, :, 0] = 1.0
    saliency[0, 1, 5] = saliency[0, 2, 7] = 1.0
    from_last = np.zeros((2, 3, 22))
    from_last[:, 0, 3] = from_last[:, 1:, 9] = 1.0
    return ItemView(
        item_id="planted",
        instruction="Where?",
        thumbnail=_grey_thumbnail(120, 60),
        tokens=["<s>", "<img0:0>", " Where", "?"],
        modalities=["special", "image", "text", "text"],
        tiles=tiles,
        saliency={"text": saliency, "last": from_last},
        lens_grid=np.zeros((3, 22), dtype=int),
        lens_last_tokens=np.zeros((3, 5), dtype=int),
        lens_last_probs=np.full((3, 5), 0.2),
    )


def test_a_planted_salient_patch_is_drawn_on_its_cell(browser, run_dir, tmp_path):
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], _Tokenizer(), title="planted", explorer=[planted_item()])
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        heat = "sal-0-0-heat"  # the heat map beside the picture (the default)
        width, height = page.evaluate(
            "[document.getElementById('sal-0-0').width, document.getElementById('sal-0-0').height]"
        )
        assert width == 2 * height  # the image's 2:1 aspect
        assert page.evaluate(
            f"[document.getElementById('{heat}').width, document.getElementById('{heat}').height]"
        ) == [
            width,
            height,
        ]

        def cell(row: int, col: int, rows: int = 3, cols: int = 6, w: int = width, h: int = height):
            return (col + 0.5) * w / cols, (row + 0.5) * h / rows

        assert pixel(page, heat, *cell(2, 4)) == TOP
        assert pixel(page, heat, *cell(0, 0)) == BOTTOM
        assert pixel(page, heat, *cell(2, 3)) == BOTTOM and pixel(page, heat, *cell(1, 4)) == BOTTOM
        side = page.evaluate("document.getElementById('sal-0-1').width")
        assert pixel(page, "sal-0-1", *cell(1, 0, 2, 2, side, side)) == TOP
        assert pixel(page, "sal-0-1", *cell(0, 0, 2, 2, side, side)) == BOTTOM

        box = page.locator("#sal-0-0").bounding_box()
        x, y = cell(2, 4, w=box["width"], h=box["height"])
        page.locator("#sal-0-0").hover(position={"x": x, "y": y})  # scrolls it into view, moves the mouse
        assert page.text_content("#sal-hover").startswith(
            "tile 0, row 2, col 4 (patch 16), layer 0, all heads: 1.00"
        )
        # just inside the cell's left and right edges (mouse positions are whole CSS pixels)
        for edge in (4 * width / 6 + 1.5, 5 * width / 6 - 1.5):
            page.locator("#sal-0-0").hover(position={"x": edge, "y": y})
            assert page.text_content("#sal-hover").startswith("tile 0, row 2, col 4 (patch 16)")

        page.select_option("#head", "1")  # head 0: patch 5 (row 0, col 5)
        assert pixel(page, heat, *cell(0, 5)) == TOP and pixel(page, heat, *cell(2, 4)) == BOTTOM
        page.select_option("#source", "last")  # head 0 from the last position: patch 9 (row 1, col 3)
        assert pixel(page, heat, *cell(1, 3)) == TOP and pixel(page, heat, *cell(0, 5)) == BOTTOM
        page.select_option("#head", "0")  # all heads from the last position: patch 3
        assert pixel(page, heat, *cell(0, 3)) == TOP
        page.select_option("#source", "text")

        page.locator("#layer").focus()
        page.keyboard.press("ArrowRight")  # layer 1 (block 1): patch 0 is the salient one
        assert page.get_attribute("#sal-0-0", "data-frame") == "text/0/1"
        assert pixel(page, heat, *cell(0, 0)) == TOP
        assert pixel(page, heat, *cell(2, 4)) == BOTTOM

        # the blended overlay, as a choice: at full opacity, the colour scale over the picture
        page.select_option("#overlay", "blend")
        assert page.eval_on_selector(f"#{heat}", "(el) => el.hidden")  # the map is on the picture
        set_range(page, "#opacity", 1)
        assert pixel(page, "sal-0-0", *cell(0, 0)) == TOP
        assert pixel(page, "sal-0-0", *cell(2, 4)) == BOTTOM
        view.assert_clean()


def test_image_tokens_that_are_not_regions_are_not_drawn_over_the_image(browser, run_dir, tmp_path):
    """InstructBLIP's 32 Q-Former queries have no place on the image: a row of their own, unblended."""
    item = planted_item()
    item.spatial = False
    item.tiles = [{"tile": 0, "rows": 1, "cols": 22, "index": list(range(22))}]
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], _Tokenizer(), title="queries", explorer=[item])
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        width, height = page.evaluate(
            "[document.getElementById('sal-0-0').width, document.getElementById('sal-0-0').height]"
        )
        assert width > 10 * height  # a strip, not the image's 2:1
        at = lambda k: ((k + 0.5) * width / 22, height / 2)  # noqa: E731
        assert pixel(page, "sal-0-0", *at(16)) == TOP and pixel(page, "sal-0-0", *at(20)) == TOP
        assert pixel(page, "sal-0-0", *at(3)) == BOTTOM  # not blended with the grey picture
        assert "not image regions" in page.text_content("#saliency-tiles figcaption")
        view.assert_clean()


def test_a_tiled_models_item_shows_every_tile(browser, run_dir, tmp_path):
    """LLaVA-NeXT (base view + 2 x 2 crops): one canvas per tile, the base view over the picture."""
    from hooked_vllm.report.explorer import explore
    from tests.conftest import Family, family_images

    vlm = Family("llava_next", tmp_path / "model").vlm
    images = family_images()[2:]
    views = explore(
        vlm, vlm.prepare(images, ["Describe the image."]), images, ["tiled"], ["Describe the image."]
    )
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], vlm.tokenizer, title="tiled", explorer=views)
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        tiles = [tile["tile"] for tile in views[0].tiles]
        assert len(tiles) == 5
        assert page.locator("#saliency-tiles canvas").count() == len(tiles) + 1  # + the base view's map
        assert page.locator("#lens-tiles canvas").count() == len(tiles)
        captions = page.locator("#saliency-tiles figcaption").all_text_contents()
        assert captions[0] == "tile 0: the whole image" and all("crop" in c for c in captions[1:])
        view.assert_clean()


def _png_thumbnail(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def canvas_array(page, canvas_id: str) -> np.ndarray:
    """A canvas's pixels, read back losslessly (``toDataURL`` is PNG), as ``[height, width, 3]``."""
    url = canvas_png(page, canvas_id)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def hover_value(text: str) -> float:
    return float(text.rsplit(": ", 1)[1])


def test_the_hover_readout_follows_every_control(browser, run_dir, tmp_path):
    """Hover a cell, then move the layer slider, the head selector, the source selector and the
    item: the readout names the layer and head now shown and holds that frame's value of the cell
    (or is cleared), never the value of the frame hovered first."""
    item = planted_item()
    for source, start in (("text", 0.1), ("last", 0.6)):  # patch 16: one value per frame
        for layer in range(2):
            for head in range(3):
                item.saliency[source][layer, head, 16] = start + 0.1 * layer + 0.03 * head
    item.lens_grid = np.array([[0] * 22, [1] * 22, [2] * 22])  # top-1 "t0", "t1", "t2" per lens layer
    other = planted_item()
    other.item_id = "other"
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], _Tokenizer(), title="hover", explorer=[item, other])
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        box = page.locator("#sal-0-0").bounding_box()
        page.locator("#sal-0-0").hover(position={"x": 4.5 * box["width"] / 6, "y": 2.5 * box["height"] / 3})
        assert page.text_content("#sal-hover").startswith("tile 0, row 2, col 4 (patch 16)")
        assert hover_value(page.text_content("#sal-hover")) == pytest.approx(0.1, rel=1e-3)

        def expect(source: str, layer_index: int, head: int) -> None:
            text = page.text_content("#sal-hover")
            label = page.eval_on_selector("#layer", "(el) => el.value")  # the layer as the slider names it
            who = "all heads" if head == 0 else f"head {head - 1}"
            assert text.startswith(f"tile 0, row 2, col 4 (patch 16), layer {label}, {who}: "), text
            start = 0.1 if source == "text" else 0.6
            assert hover_value(text) == pytest.approx(start + 0.1 * layer_index + 0.03 * head, rel=1e-3), text

        page.locator("#layer").focus()
        page.keyboard.press("ArrowRight")  # the second layer
        expect("text", 1, 0)
        page.select_option("#head", "2")  # head 1
        expect("text", 1, 2)
        page.select_option("#source", "last")
        expect("last", 1, 2)
        page.locator("#layer").focus()
        page.keyboard.press("ArrowLeft")
        expect("last", 0, 2)

        box = page.locator("#lens-0-0").bounding_box()
        page.locator("#lens-0-0").hover(position={"x": 4.5 * box["width"] / 6, "y": 2.5 * box["height"] / 3})
        assert page.text_content("#lens-hover").endswith('top-1 "t0"')
        set_range(page, "#lens-layer", 2)
        assert page.text_content("#lens-hover").endswith('layer 2: top-1 "t2"')

        page.click('#item-index a[data-item="1"]')
        wait_for_item(page, 1)
        for readout in ("#sal-hover", "#lens-hover"):  # another item: nothing hovered on it yet
            assert page.text_content(readout) == ""
        view.assert_clean()


def colourful_picture(width: int = 96, height: int = 48) -> Image.Image:
    """Saturated colours that a blended overlay would change: one per 16 x 16 cell, with a yellow
    disc and a red square inside some cells."""
    rng = np.random.default_rng(1)
    cells = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    pixels = np.kron(cells, np.ones((16, 16, 1), dtype=np.uint8))
    pixels[36:44, 68:76] = (220, 30, 30)  # a red square in cell (2, 4)
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - 8) ** 2 + (xx - 8) ** 2 < 25] = (235, 210, 20)  # a yellow disc in cell (0, 0)
    return Image.fromarray(pixels)


def test_the_default_overlay_leaves_the_pictures_colours_alone(browser, run_dir, tmp_path):
    """By default the picture under the saliency is drawn untouched: every pixel away from the
    outlines of the top cells is the picture's own (a 96 x 48 PNG drawn 4x on a 384 x 192 canvas),
    so a yellow object does not read as high saliency nor a red square as orange."""
    item = planted_item()
    picture = colourful_picture()
    item.thumbnail = _png_thumbnail(picture)
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], _Tokenizer(), title="colours", explorer=[item])
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        drawn = canvas_array(page, "sal-0-0").astype(int)
        assert drawn.shape == (192, 384, 3)
        expected = np.kron(np.asarray(picture), np.ones((4, 4, 1), dtype=np.uint8)).astype(int)
        # the top cell at this frame (instruction, all heads, first layer): patch 16, row 2, col 4
        near = np.zeros(drawn.shape[:2], dtype=bool)
        top, left, cell = 2 * 64, 4 * 64, 64
        near[max(0, top - 4) : top + cell + 4, left - 4 : left + cell + 4] = True
        near[top + 4 : top + cell - 4, left + 4 : left + cell - 4] = False  # the cell's inside
        changed = np.abs(drawn - expected).max(-1) > 2
        assert not changed[~near].any(), f"{changed[~near].sum()} pixels away from the outline changed"
        assert changed[near].any()  # the outline is drawn
        assert tuple(drawn[160, 288]) == (220, 30, 30)  # the red square stays red
        view.assert_clean()


def corner_marks(width: int = 120, height: int = 60) -> tuple[Image.Image, dict]:
    """A 2:1 picture with a mark of its own colour in each corner (10 x 10 pixels)."""
    marks = {
        "top left": (220, 30, 30),
        "top right": (30, 170, 40),
        "bottom left": (30, 60, 220),
        "bottom right": (200, 0, 200),
    }
    pixels = np.full((height, width, 3), 235, dtype=np.uint8)
    pixels[:10, :10], pixels[:10, -10:] = marks["top left"], marks["top right"]
    pixels[-10:, :10], pixels[-10:, -10:] = marks["bottom left"], marks["bottom right"]
    return Image.fromarray(pixels), marks


def marks_seen(png: bytes, marks: dict) -> dict:
    """How many pixels of each mark's colour (within 40 per channel) a screenshot holds."""
    shot = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return {name: int((np.abs(shot - colour).max(-1) < 40).sum()) for name, colour in marks.items()}


def test_thumbnails_and_the_item_picture_show_the_whole_region(browser, run_dir, tmp_path):
    """The index thumbnail of a 2:1 picture shows all four corner marks (nothing is cropped off), and
    the item's picture is shown at least 256 pixels on its long side, whole."""
    picture, marks = corner_marks()
    item = planted_item()
    item.thumbnail = _png_thumbnail(picture)
    aggregates = json.loads((run_dir / "aggregates.json").read_text())
    write_report(tmp_path, aggregates, [], _Tokenizer(), title="corners", explorer=[item])
    with open_page(tmp_path / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        seen = marks_seen(page.locator('#item-index a[data-item="0"] img').screenshot(), marks)
        assert all(count >= 30 for count in seen.values()), seen  # a 10 x 10 mark at 106/120 scale: ~78
        shown = page.locator("#picture img").bounding_box()
        assert max(shown["width"], shown["height"]) >= 256
        assert shown["width"] == pytest.approx(2 * shown["height"], abs=2)
        seen = marks_seen(page.locator("#picture img").screenshot(), marks)
        assert all(count >= 100 for count in seen.values()), seen
        view.assert_clean()


def test_the_lens_figures_two_axes_start_at_zero_on_one_baseline(browser, run_dir):
    """KL (left axis) and the fraction of items already at the final top-1 (right axis): both
    start at 0, on the same horizontal line."""
    with open_page(run_dir / "report.html", browser, viewport=(1280, 1100)) as view:
        page = view.page
        zeros = page.evaluate(
            """() => [...document.querySelectorAll('.js-plotly-plot')]
                .filter((gd) => gd._fullLayout.yaxis2 && gd._fullLayout.yaxis2.overlaying)
                .map((gd) => { const left = gd._fullLayout.yaxis, right = gd._fullLayout.yaxis2;
                    return [left.l2p(0), right.l2p(0), left.range[0], right.range[0],
                            left.l2p(left.range[0]), right.l2p(right.range[0])]; })"""
        )
        assert len(zeros) == 1, zeros
        left_zero, right_zero, left_low, right_low, left_bottom, right_bottom = zeros[0]
        assert left_low == pytest.approx(0, abs=1e-9) and right_low == pytest.approx(0, abs=1e-9), zeros
        assert left_zero == pytest.approx(right_zero, abs=0.5) and left_zero == pytest.approx(left_bottom)
        view.assert_clean()
