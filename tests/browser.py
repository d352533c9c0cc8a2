"""Headless-Chromium harness for browser tests of offline HTML files (the report, tutorials' output).

It drives the system Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``; another binary
through ``HOOKED_VLLM_CHROMIUM``) with Playwright's sync API; Playwright's own browser downloads are
never used. Pages are opened from ``file://`` URLs with no network at all: every other request is
aborted and recorded in ``blocked``. Console errors and uncaught exceptions are recorded in ``errors``.

Without Chromium or Playwright a test that asks for a browser is skipped, with the fix as the reason;
with ``HOOKED_VLLM_REQUIRE_BROWSER=1`` (set by ``.ci/run``) it fails instead.

Usage, with one browser per test module (launching takes well under a second, the driver about as much)::

    from tests.browser import launch_browser, open_page

    @pytest.fixture(scope="module")
    def browser():
        with launch_browser() as browser:
            yield browser

    def test_report(browser, tmp_path):
        with open_page(tmp_path / "report.html", browser) as view:
            view.page.locator("input[type=range]").focus()
            view.page.keyboard.press("ArrowRight")
            view.screenshot(tmp_path / "report.png")
            view.assert_clean()  # no console errors, no uncaught exceptions, no network requests

``open_page(path)`` without a browser launches (and closes) its own; don't do that while a module's
``browser`` fixture is alive: Playwright's sync API allows one running instance per thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Route, WebSocketRoute

#: Chromium binary to drive; override with the HOOKED_VLLM_CHROMIUM environment variable
DEFAULT_CHROMIUM = "/usr/bin/chromium"
#: on top of Playwright's ``--headless`` and ``--no-sandbox`` (``chromium_sandbox=False``): no GPU, and
#: none of Chromium's own background connections (refused on a closed network, and noisy)
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL_HINT = "apt-get install chromium"


def chromium_path() -> str:
    return os.environ.get("HOOKED_VLLM_CHROMIUM", DEFAULT_CHROMIUM)


def browser_unavailable(reason: str) -> NoReturn:
    """Skip the calling test, or fail it where CI demands a browser (HOOKED_VLLM_REQUIRE_BROWSER=1)."""
    if os.environ.get("HOOKED_VLLM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (HOOKED_VLLM_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


@contextmanager
def launch_browser() -> Iterator[Browser]:
    """The system Chromium, headless, closed on exit; skips (or fails, see above) when it is missing."""
    executable = chromium_path()
    if not (os.path.isfile(executable) and os.access(executable, os.X_OK)):
        browser_unavailable(f"no Chromium at {executable}: {INSTALL_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        browser_unavailable('playwright is not installed: pip install -c constraints.txt -e ".[dev]"')
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, chromium_sandbox=False, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class BrowserPage:
    """An open page, with what went wrong on it so far."""

    page: Page
    #: console.error messages and uncaught exceptions, as "console.error: <text> (<url>:<line>)" and
    #: "uncaught <name>: <message>"; an aborted request also logs a console error ("Failed to load ...")
    errors: list[str] = field(default_factory=list)
    #: URLs of the requests that were aborted (anything but file: and data: URLs, websockets included)
    blocked: list[str] = field(default_factory=list)

    def screenshot(self, path: str | Path, full_page: bool = True) -> Path:
        """Save a PNG of the page (the whole scrollable page unless full_page=False); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        return path

    def settle(self) -> None:
        """Take in the console messages and exceptions that the page has emitted until now."""
        self.page.evaluate("() => new Promise(requestAnimationFrame)")

    def assert_clean(self) -> None:
        """Fail unless the page logged no errors, threw no exceptions and asked for nothing on the network."""
        self.settle()
        assert not (self.errors or self.blocked), f"errors: {self.errors}, blocked requests: {self.blocked}"


@contextmanager
def open_page(
    target: str | Path, browser: Browser | None = None, viewport: tuple[int, int] = (1280, 800)
) -> Iterator[BrowserPage]:
    """Open a local HTML file (a path or a file:// URL) with the network cut off, and wait for its load.

    ``browser``: one from ``launch_browser()``; without it, a browser is launched for this page alone.
    Each page gets a fresh browser context (no cookies, storage or cache shared with other pages).
    """
    if browser is None:
        with launch_browser() as own_browser, open_page(target, own_browser, viewport) as view:
            yield view
        return
    url = str(target) if str(target).startswith("file://") else Path(target).resolve().as_uri()
    if not url.startswith("file://"):
        raise ValueError(f"not a local file: {target}")
    if not str(target).startswith("file://") and not Path(target).is_file():
        raise FileNotFoundError(target)

    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height}, service_workers="block")
    try:
        view = BrowserPage(context.new_page())

        def route(route: Route) -> None:
            if route.request.url.startswith(("file:", "data:")):
                route.continue_()
            else:
                view.blocked.append(route.request.url)
                route.abort("blockedbyclient")

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                where = message.location
                view.errors.append(
                    f"console.error: {message.text} ({where.get('url')}:{where.get('lineNumber')})"
                )

        def on_page_error(error: Error) -> None:
            view.errors.append(f"uncaught {error.name}: {error.message}")

        def route_web_socket(socket: WebSocketRoute) -> None:
            # never connect_to_server(): the page's socket talks to nobody. (socket.close() here
            # deadlocks playwright 1.49's sync API.)
            view.blocked.append(socket.url)

        context.route("**/*", route)
        context.route_web_socket("**/*", route_web_socket)
        view.page.on("console", on_console)
        view.page.on("pageerror", on_page_error)
        view.page.goto(url, wait_until="load")
        view.settle()
        yield view
    finally:
        context.close()
