"""The browser tests' set-up: `make test` installs Chromium where it can, else one clear line.

Chromium is installed on the machines that run this suite, so the missing case is made by
pointing REMAP_CHROMIUM at a path that does not exist (never by uninstalling it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/.installed"  # make must not rebuild the venv here (-o: take it as up to date)


def _env(**extra) -> dict:
    """This process's environment, less what a calling `make test` passes down to its children
    (under MAKELEVEL a nested make says 'make[1]: ***', not 'make: ***')."""
    env = {k: v for k, v in os.environ.items() if k not in _MAKE_VARIABLES}
    return dict(env, TF_CPP_MIN_LOG_LEVEL="3", **extra)


_MAKE_VARIABLES = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")


def test_a_missing_browser_that_cannot_be_installed_is_one_line():
    done = subprocess.run(
        [sys.executable, "-m", "tests.browser"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(REMAP_CHROMIUM="/nonexistent/chromium"),
        timeout=60,
    )
    assert done.returncode == 1, done
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("make browser: error: Chromium is missing at /nonexistent/chromium")
    assert "apt-get install -y chromium" in line and "REMAP_CHROMIUM" in line
    assert done.stdout == ""


def test_a_present_browser_is_quiet():
    done = subprocess.run(
        [sys.executable, "-m", "tests.browser"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(REMAP_CHROMIUM=sys.executable),  # any executable file passes the check
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


@pytest.mark.parametrize("target", ["test", "test-slow"])
def test_make_test_and_ci_run_the_browser_setup_first(target):
    """`.ci/run` runs `make test` and `make test-slow` only, so it gets the same set-up."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith("make")] == ["make test", "make test-slow"]
    plan = subprocess.run(
        ["make", "-n", "-o", STAMP, target], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert plan.returncode == 0, plan.stderr
    commands = plan.stdout.splitlines()
    setup = [i for i, c in enumerate(commands) if c.endswith("python -m tests.browser")]
    tests = [i for i, c in enumerate(commands) if "pytest" in c]
    assert setup and tests and setup[0] < tests[0], commands


def test_make_stops_on_a_missing_browser_with_its_one_line():
    done = subprocess.run(
        ["make", "-s", "-o", STAMP, "browser"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(REMAP_CHROMIUM="/nonexistent/chromium"),
        timeout=60,
    )
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(ours) == 1 and "Chromium is missing at /nonexistent/chromium" in ours[0], done


_BROWSER_TESTS = """
from tests.conftest import chromium  # noqa: F401  (the fixture under test)


def test_one(chromium):
    raise AssertionError("never reached: the fixture fails first")


def test_two(chromium):
    raise AssertionError("never reached: the fixture fails first")
"""


def test_browser_tests_fail_in_one_line_each_without_a_traceback(tmp_path):
    (tmp_path / "test_pages.py").write_text(_BROWSER_TESTS)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(REMAP_CHROMIUM="/nonexistent/chromium", PYTHONPATH=str(ROOT)),
        timeout=300,
    )
    out = done.stdout
    assert done.returncode == 1 and "2 errors" in out, out
    line = "the browser tests need Chromium: Chromium is missing at /nonexistent/chromium"
    lines = out.splitlines()
    sections = [i for i, text in enumerate(lines) if "ERROR at setup of test_" in text]
    assert len(sections) == 2, out
    for i in sections:  # each error's whole report: the one line, then the next header
        assert lines[i + 1].startswith(line) and lines[i + 2].startswith(
            "___" if i == sections[0] else "==="
        ), out
    assert "Traceback" not in out and "never reached" not in out and "def chromium" not in out
