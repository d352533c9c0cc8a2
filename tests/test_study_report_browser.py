"""The studies' reports in a real browser (headless Chromium, offline): ``hooked-vllm study knockout``
on the demo model writes a page that loads with no console error and no network request, draws one
curve per edge type over every window start, and prints the paper's findings beside ours (as theirs,
with no pass/fail). A screenshot goes to docs/screenshots/ (a CI artefact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hooked_vllm.cli import main
from tests.browser import launch_browser, open_page

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


@pytest.fixture(scope="module")
def browser():
    with launch_browser() as browser:
        yield browser


@pytest.fixture(scope="module")
def knockout_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "knockout"
    assert main(["study", "knockout", "--out", str(out), "--num-items", "8", "--no-progress"]) == 0
    return out


def test_the_knockout_report_opens_offline_with_its_curves_and_theirs_beside_ours(browser, knockout_run):
    aggregates = json.loads((knockout_run / "aggregates.json").read_text())
    with open_page(knockout_run / "report.html", browser, viewport=(1100, 900)) as view:
        page = view.page
        assert page.locator("svg#knockout-curves").count() == 1
        legend = page.locator("svg#knockout-curves text").all_text_contents()
        text = page.inner_text("body")
        for edge in aggregates["edges"]:
            assert edge in text
        # matplotlib writes each text as paths with the string in a comment: count the curves instead
        curves = page.evaluate(
            "() => document.querySelectorAll('svg#knockout-curves g[id^=line2d] path').length"
        )
        assert curves >= len(aggregates["edges"]), (curves, legend)
        theirs = page.locator("#theirs table tbody tr")
        assert theirs.count() == len(aggregates["edges"])
        assert "Zhang" in page.inner_text("#theirs") and "never read a difference as a failure" in text
        assert "pass" not in page.inner_text("#theirs table").lower()
        windows = page.locator("#windows table tbody tr")
        assert windows.count() == len(aggregates["window_starts"]) == 5  # 6 blocks, windows of 2
        view.screenshot(SCREENSHOTS / "study-knockout.png")
        view.assert_clean()


@pytest.fixture(scope="module")
def pruning_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "pruning"
    assert main(["study", "pruning", "--out", str(out), "--num-items", "8", "--no-progress"]) == 0
    return out


def test_the_pruning_report_shows_the_grid_the_rows_and_theirs_beside_ours(browser, pruning_run):
    aggregates = json.loads((pruning_run / "aggregates.json").read_text())
    with open_page(pruning_run / "report.html", browser, viewport=(1100, 900)) as view:
        page = view.page
        lines = "() => document.querySelectorAll('svg#{} g[id^=line2d] path').length"
        # one line per K and criterion, plus the unpruned / no-bias reference line
        n_layers = len(aggregates["params"]["layers"])
        assert page.evaluate(lines.format("pruning-accuracy")) >= 2 * n_layers + 1
        assert page.evaluate(lines.format("pruning-rows")) >= 2 * n_layers + 1
        assert page.locator("#grid table tbody tr").count() == len(aggregates["settings"]) == 12
        assert page.locator("#rows table tbody tr").count() == 2 * n_layers
        assert page.locator("#theirs table tbody tr").count() == 2
        text = page.inner_text("#theirs")
        assert "FastV" in text and "FEATHER" in text and "never read a difference as a failure" in text
        assert "pass" not in page.inner_text("#theirs table").lower()
        view.screenshot(SCREENSHOTS / "study-pruning.png")
        view.assert_clean()


@pytest.fixture(scope="module")
def object_ablation_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "object-ablation"
    args = ["study", "object-ablation", "--out", str(out), "--num-items", "8", "--no-progress"]
    assert main([*args, "--lens-words", "name", "colour"]) == 0
    return out


def test_the_object_ablation_report_shows_the_bars_the_lens_and_theirs_beside_ours(
    browser, object_ablation_run
):
    aggregates = json.loads((object_ablation_run / "aggregates.json").read_text())
    with open_page(object_ablation_run / "report.html", browser, viewport=(1100, 900)) as view:
        page = view.page
        bars = page.evaluate("() => document.querySelectorAll('svg#ablation-bars g[id^=patch]').length")
        assert bars >= 2 * (1 + len(aggregates["by_kind"]))  # object and random, per group
        lines = page.evaluate("() => document.querySelectorAll('svg#lens-curves g[id^=line2d] path').length")
        assert lines >= 2 * len(aggregates["lens"]) == 4  # object and background, per word
        assert page.locator("#lens table tbody tr").count() == aggregates["n_layers"] + 1
        assert page.locator("#ablation table tbody tr").count() == 1 + len(aggregates["by_kind"])
        assert page.locator("#theirs table tbody tr").count() == 2
        assert "Neo" in page.inner_text("#theirs") and "never read a difference" in page.inner_text("#theirs")
        assert "pass" not in page.inner_text("#theirs table").lower()
        view.screenshot(SCREENSHOTS / "study-object-ablation.png")
        view.assert_clean()


@pytest.fixture(scope="module")
def attribution_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "attribution"
    args = ["study", "attribution", "--out", str(out), "--num-items", "8", "--cells", "8", "--no-progress"]
    assert main([*args, "--kinds", "resid_pre", "z"]) == 0
    return out


def test_the_attribution_report_shows_the_maps_the_scatter_and_theirs_beside_ours(browser, attribution_run):
    aggregates = json.loads((attribution_run / "aggregates.json").read_text())
    assert list(aggregates["kinds"]) == ["resid_pre", "z"] and aggregates["n_items"] > 0
    with open_page(attribution_run / "report.html", browser, viewport=(1100, 900)) as view:
        page = view.page
        for kind in aggregates["kinds"]:  # the estimate's and real patching's block x group maps
            maps = f"() => document.querySelectorAll('svg#attribution-heatmap-{kind} image').length"
            assert page.evaluate(maps) == 3, kind  # the two maps and their colour bar
        heads = "() => document.querySelectorAll('svg#attribution-heads-z image').length"
        assert page.evaluate(heads) == 3  # z: the block x head maps
        points = "() => document.querySelectorAll('svg#attribution-scatter g[id^=PathCollection]').length"
        assert page.evaluate(points) >= len(aggregates["kinds"])
        rows = page.locator("#agreement table tbody tr")
        assert rows.count() == len(aggregates["kinds"])
        for i, (kind, result) in enumerate(aggregates["kinds"].items()):
            cells = rows.nth(i).locator("td")
            assert cells.nth(0).inner_text() == f"hook_{kind}"
            assert cells.nth(1).inner_text() == f"{result['cells']['pearson']:.3g}"
            assert cells.nth(2).inner_text() == f"{result['cells']['spearman']:.3g}"
        assert page.locator("#theirs table tbody tr").count() == 3
        text = page.inner_text("#theirs")
        assert "Nanda" in text and "Syed" in text and "Kramár" in text and "saturation" in text
        assert "never read a difference as a failure" in text
        assert "pass" not in page.inner_text("#theirs table").lower()
        view.screenshot(SCREENSHOTS / "study-attribution.png")
        view.assert_clean()
