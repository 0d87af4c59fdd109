"""Opens pages in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

`playwright install` cannot download browsers here, so the tests use the system Chromium;
`.ci/run` installs it where it is missing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this machine cannot reach.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.contextmanager
def page(width: int = 1280, height: int = 900):
    """A fresh headless Chromium page of ``width`` x ``height`` CSS pixels."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def load_file(browser_page, path: Path) -> dict:
    """Opens a local HTML file; returns what a reader would notice is broken.

    Returns:
        ``{"images": n, "broken": [src of images that did not load], "overflow": px of
        horizontal scrolling (0 when the page fits its width)}``.
    """
    browser_page.goto(Path(path).resolve().as_uri())
    browser_page.wait_for_load_state("load")
    return browser_page.evaluate(
        """() => {
            const images = Array.from(document.images);
            return {
                images: images.length,
                broken: images.filter(i => !(i.complete && i.naturalWidth > 0))
                              .map(i => i.getAttribute('src')),
                overflow: document.documentElement.scrollWidth - window.innerWidth,
            };
        }"""
    )
