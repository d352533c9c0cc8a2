"""The headless-Chromium harness (tests/browser.py) on tiny pages: errors, blocked requests, input, PNGs."""

from __future__ import annotations

import pytest
from PIL import Image

from tests.browser import launch_browser, open_page


@pytest.fixture(scope="module")
def browser():
    with launch_browser() as browser:
        yield browser


def html(tmp_path, body: str, name: str = "page.html"):
    path = tmp_path / name
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>t</title></head>{body}</html>")
    return path


def test_console_error_is_reported(browser, tmp_path):
    with open_page(html(tmp_path, "<script>console.error('broken: ' + 6 * 7)</script>"), browser) as view:
        assert len(view.errors) == 1
        assert view.errors[0].startswith("console.error: broken: 42 (file://")
        assert view.blocked == []
        with pytest.raises(AssertionError, match="broken: 42"):
            view.assert_clean()


def test_uncaught_exception_is_reported(browser, tmp_path):
    page = html(tmp_path, "<script>console.log('fine'); null.layer</script>")
    with open_page(page, browser) as view:
        assert view.errors == ["uncaught TypeError: Cannot read properties of null (reading 'layer')"]


def test_error_after_load_is_reported(browser, tmp_path):
    page = html(tmp_path, "<button onclick=\"throw new RangeError('bad layer')\">go</button>")
    with open_page(page, browser) as view:
        assert view.errors == []
        view.page.click("button")
        view.settle()
        assert view.errors == ["uncaught RangeError: bad layer"]


def test_clean_page_has_no_errors(browser, tmp_path):
    (tmp_path / "local.js").write_text("document.body.dataset.ready = 'yes'; console.warn('only a warning');")
    page = html(tmp_path, "<body><p>report</p><script src='local.js'></script></body>")
    with open_page(page, browser) as view:
        view.assert_clean()
        assert view.page.get_attribute("body", "data-ready") == "yes"  # local files do load


def test_network_requests_are_blocked_and_recorded(browser, tmp_path):
    body = """<body><script src="https://cdn.example.com/lib.js"></script>
    <img src="http://example.com/logo.png">
    <script>window.libLoaded = typeof lib !== "undefined"; new WebSocket("wss://example.com/live");</script>
    </body>"""
    with open_page(html(tmp_path, body), browser) as view:
        view.page.wait_for_timeout(100)  # the websocket opens asynchronously
        view.settle()
        assert sorted(view.blocked) == [
            "http://example.com/logo.png",
            "https://cdn.example.com/lib.js",
            "wss://example.com/live",
        ]
        assert view.page.evaluate("window.libLoaded") is False
        with pytest.raises(AssertionError, match="cdn.example.com"):
            view.assert_clean()


def test_slider_moves_with_the_keyboard(browser, tmp_path):
    body = """<body><input type="range" id="layer" min="0" max="5" value="2"><span id="out">layer 2</span>
    <script>
      document.getElementById("layer").addEventListener("input", event => {
        document.getElementById("out").textContent = "layer " + event.target.value;
      });
    </script></body>"""
    with open_page(html(tmp_path, body), browser) as view:
        view.page.focus("#layer")
        view.page.keyboard.press("ArrowRight")
        view.page.keyboard.press("ArrowRight")
        assert view.page.input_value("#layer") == "4"
        assert view.page.text_content("#out") == "layer 4"
        view.page.keyboard.press("End")
        assert view.page.text_content("#out") == "layer 5"
        view.assert_clean()


def test_screenshot_is_a_png_of_the_whole_page(browser, tmp_path):
    page = html(tmp_path, "<body style='margin:0'><div style='height:2000px;background:#36c'></div></body>")
    with open_page(page, browser, viewport=(640, 480)) as view:
        full = view.screenshot(tmp_path / "shots" / "full.png")
        visible = view.screenshot(tmp_path / "shots" / "visible.png", full_page=False)
    for path, size in [(full, (640, 2000)), (visible, (640, 480))]:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 0
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size == size
            assert image.convert("RGB").getpixel((10, 10)) == (0x33, 0x66, 0xCC)


def test_missing_file_is_an_error(browser, tmp_path):
    with pytest.raises(FileNotFoundError):
        with open_page(tmp_path / "missing.html", browser):
            pass


def test_missing_chromium_skips_or_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("HOOKED_VLLM_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("HOOKED_VLLM_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        with launch_browser():
            pass
    monkeypatch.setenv("HOOKED_VLLM_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install chromium"):
        with launch_browser():
            pass
