"""The report in a real browser (headless Chromium, offline): it loads with no console error and no
network request, every figure has data, the explorer's layer slider and head selector redraw the
saliency overlay, a planted salient patch is drawn on its own cell of a non-square grid and of a
second tile, and hovering names the cell. Screenshots of the overview and of an item go to
docs/screenshots/ (CI artefacts)."""

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
    assert main(["phase-diagram", "--out", str(out), "--no-progress", "--report-items", "4"]) == 0
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
            colours = canvas.evaluate(
                "(c) => new Set(Array.from("
                "c.getContext('2d').getImageData(0, 0, c.width, c.height).data)).size"
            )
            assert colours > 10  # drawn, not blank
        assert page.locator("#lens-last tr").count() == page.eval_on_selector("#layer", "(el) => +el.max") + 2
        view.screenshot(SCREENSHOTS / "report-overview.png", full_page=False)
        view.assert_clean()


def test_the_layer_slider_and_head_selector_redraw_the_overlay(browser, run_dir):
    with open_page(run_dir / "report.html", browser, viewport=(1280, 1400)) as view:
        page = view.page
        wait_for_item(page, 0)
        page.click('#item-index a[data-item="1"]')
        wait_for_item(page, 1)
        canvas = "sal-1-0"
        page.locator("#explorer-heading").scroll_into_view_if_needed()
        first = canvas_png(page, canvas)
        page.locator("#layer").focus()
        page.keyboard.press("ArrowRight")  # a real key press on the slider
        assert page.get_attribute(f"#{canvas}", "data-frame") == "text/0/2"
        assert page.text_content("#layer-label") == "layer 2"
        second = canvas_png(page, canvas)
        assert second != first
        page.select_option("#head", "1")  # head 0
        assert page.get_attribute(f"#{canvas}", "data-frame") == "text/1/2"
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
    all heads: at layer 1 patches 16 (tile 0, row 2, col 4) and 20 (tile 1, row 1, col 0) are
    salient, at layer 2 patch 0; head 0 at layer 1: patch 5; from the last position, all heads at
    layer 1: patch 3 (so a wrong head or source index draws the wrong cell)."""
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
        set_range(page, "#opacity", 1)  # the overlay alone, not blended with the picture
        width, height = page.evaluate(
            "[document.getElementById('sal-0-0').width, document.getElementById('sal-0-0').height]"
        )
        assert width == 2 * height  # the image's 2:1 aspect

        def cell(row: int, col: int, rows: int = 3, cols: int = 6, w: int = width, h: int = height):
            return (col + 0.5) * w / cols, (row + 0.5) * h / rows

        assert pixel(page, "sal-0-0", *cell(2, 4)) == TOP
        assert pixel(page, "sal-0-0", *cell(0, 0)) == BOTTOM
        assert pixel(page, "sal-0-0", *cell(2, 3)) == BOTTOM and pixel(page, "sal-0-0", *cell(1, 4)) == BOTTOM
        side = page.evaluate("document.getElementById('sal-0-1').width")
        assert pixel(page, "sal-0-1", *cell(1, 0, 2, 2, side, side)) == TOP
        assert pixel(page, "sal-0-1", *cell(0, 0, 2, 2, side, side)) == BOTTOM

        box = page.locator("#sal-0-0").bounding_box()
        x, y = cell(2, 4, w=box["width"], h=box["height"])
        page.locator("#sal-0-0").hover(position={"x": x, "y": y})  # scrolls it into view, moves the mouse
        assert page.text_content("#sal-hover").startswith(
            "tile 0, row 2, col 4 (patch 16), layer 1, all heads: 1.00"
        )
        # just inside the cell's left and right edges (mouse positions are whole CSS pixels)
        for edge in (4 * width / 6 + 1.5, 5 * width / 6 - 1.5):
            page.locator("#sal-0-0").hover(position={"x": edge, "y": y})
            assert page.text_content("#sal-hover").startswith("tile 0, row 2, col 4 (patch 16)")

        page.select_option("#head", "1")  # head 0: patch 5 (row 0, col 5)
        assert pixel(page, "sal-0-0", *cell(0, 5)) == TOP and pixel(page, "sal-0-0", *cell(2, 4)) == BOTTOM
        page.select_option("#source", "last")  # head 0 from the last position: patch 9 (row 1, col 3)
        assert pixel(page, "sal-0-0", *cell(1, 3)) == TOP and pixel(page, "sal-0-0", *cell(0, 5)) == BOTTOM
        page.select_option("#head", "0")  # all heads from the last position: patch 3
        assert pixel(page, "sal-0-0", *cell(0, 3)) == TOP
        page.select_option("#source", "text")

        page.locator("#layer").focus()
        page.keyboard.press("ArrowRight")  # layer 2: patch 0 is the salient one
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
        assert page.locator("#saliency-tiles canvas").count() == len(tiles)
        assert page.locator("#lens-tiles canvas").count() == len(tiles)
        captions = page.locator("#saliency-tiles figcaption").all_text_contents()
        assert captions[0] == "tile 0: the whole image" and all("crop" in c for c in captions[1:])
        view.assert_clean()
