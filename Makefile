# Every target does its own set-up on a fresh machine: a .venv, a CPU build of torch, then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so that pip takes the CPU wheel on disk instead of resolving a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= test,plots
STAMP  := $(VENV)/.pyroflows-installed

.PHONY: demo test test-slow bench bench-quick docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The benchmark suite against the peers (the bench extra installs normflows); writes benchmarks/results/*.json
# and benchmarks/RESULTS.md. bench-quick is the smoke test (a few minutes on a CPU, *_quick.json).
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(BIN)/python -m benchmarks all

bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(BIN)/python -m benchmarks all --quick

# The HTML documentation, built from scratch with warnings as errors (docs/api is generated from docs/api.rst).
docs: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),docs]"
	rm -rf docs/_build docs/api
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check pyroflows tests benchmarks examples docs
	$(BIN)/ruff format --check pyroflows tests benchmarks examples docs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build docs/api
