"""Test-wide settings: quiet TensorFlow logs, seeded Keras, float32 policy restored."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras
import pytest


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Each test starts seeded and under float32, whatever the previous test set."""
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium the browser tests drive (tests/browser.py). Checked once per session,
    before a test's expensive set-up: where it is missing, every browser test fails with the
    same one line (how to install it), not a Playwright traceback."""
    from tests import browser

    return browser.require_chromium()
