# One command for each job. Both create .venv on first use, so a fresh clone needs only
# Python 3.10-3.12 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser test test-slow lint demo bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The browser tests drive Debian's Chromium (Playwright's own download cannot run here): this
# installs it with apt-get where /usr/bin/chromium is missing (as root, or with sudo), or says
# in one line why it cannot and stops. REMAP_CHROMIUM=/path names another Chromium.
browser: $(STAMP)
	@$(BIN)/python -m tests.browser

# The default suite: lint plus every test not marked slow (under 15 minutes on 2 cores).
test: lint browser
	$(BIN)/pytest -m "not slow"

# Tests too slow for the default suite (multi-process training, large indexes).
test-slow: $(STAMP) browser
	$(BIN)/pytest -m slow

# The main job: train, export, index and search on the embedded scikit-image photos.
demo: $(STAMP)
	$(BIN)/remap demo --out demo_out

# The benchmarks install their competitors (faiss-cpu, hnswlib) and psutil first.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
