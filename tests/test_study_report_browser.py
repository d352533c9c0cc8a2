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
