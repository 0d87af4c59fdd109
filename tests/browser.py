"""Opens pages in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

`playwright install` cannot download browsers here, so the tests use the system Chromium, at
``$REMAP_CHROMIUM`` if set. ``python -m tests.browser`` (``make browser``, which ``make test``,
``make test-slow`` and so ``.ci/run`` run first) installs Debian's package where it is missing,
or says in one line why it cannot; the ``chromium`` fixture (``tests/conftest.py``) fails the
browser tests with that same line instead of a Playwright traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Where Debian's `chromium` package puts the browser; REMAP_CHROMIUM names another one.
DEFAULT_CHROMIUM = "/usr/bin/chromium"
INSTALL_HINT = "apt-get install -y chromium"
# Without the background-networking flags Chromium keeps trying hosts this machine cannot reach.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    """The browser the tests drive: ``$REMAP_CHROMIUM``, else Debian's /usr/bin/chromium."""
    return os.environ.get("REMAP_CHROMIUM") or DEFAULT_CHROMIUM


def missing(path: str) -> str | None:
    """``"Chromium is missing at <path>"`` if no browser can be run from ``path``; else None."""
    if os.path.isfile(path) and os.access(path, os.X_OK):
        return None
    return f"Chromium is missing at {path}"


def require_chromium() -> str:
    """The browser's path; fails the calling test in one line (no traceback) if it is missing."""
    path = chromium_path()
    problem = missing(path)
    if problem is not None:
        import pytest

        pytest.fail(
            f"the browser tests need Chromium: {problem}; run `make browser` (it installs "
            f"Debian's chromium where it can) or point REMAP_CHROMIUM at one",
            pytrace=False,
        )
    return path


@contextlib.contextmanager
def page(width: int = 1280, height: int = 900):
    """A fresh headless Chromium page of ``width`` x ``height`` CSS pixels."""
    from playwright.sync_api import sync_playwright

    path = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=ARGS)
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


# --- setup: `python -m tests.browser` ---------------------------------------------------------


def _apt_command() -> tuple[list[str] | None, str]:
    """The prefix that runs apt-get as root (``[]`` or ``["sudo", "-n"]``), or why there is none."""
    if shutil.which("apt-get") is None:
        return None, "this machine has no apt-get"
    if os.geteuid() == 0:
        return [], ""
    if shutil.which("sudo") is None:
        return None, "not root, and no sudo"
    return ["sudo", "-n"], ""


def _apt_install(prefix: list[str]) -> str | None:
    """Installs Debian's chromium package quietly; None on success, else apt's last words."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"],
    )
    for step in steps:
        done = subprocess.run([*prefix, *step], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip().splitlines()
            return f"`{' '.join([*prefix, *step])}` failed: {said[-1] if said else done.returncode}"
    return None


def install() -> int:
    """Makes sure the browser tests have Chromium; 0 if they do, else 1 and one line on stderr.

    Debian's package is installed with apt-get (as root, or through passwordless sudo) when
    /usr/bin/chromium is missing; a missing ``$REMAP_CHROMIUM`` elsewhere is not ours to install.
    """
    path = chromium_path()
    if missing(path) is None:
        return 0
    why_not = "REMAP_CHROMIUM names it; only /usr/bin/chromium is installed here"
    if path == DEFAULT_CHROMIUM:
        prefix, why_not = _apt_command()
        if prefix is not None:
            print("installing chromium (apt-get) for the browser tests", file=sys.stderr)
            why_not = _apt_install(prefix) or "apt-get installed no /usr/bin/chromium"
            if missing(path) is None:
                return 0
    print(
        f"make browser: error: {missing(path)} and cannot be installed ({why_not}); install it "
        f"(`{INSTALL_HINT}` on Debian) or point REMAP_CHROMIUM at one",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(install())
