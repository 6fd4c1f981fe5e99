# Every target does its own set-up on a fresh machine: a .venv, a CPU build of torch, then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so that pip takes the CPU wheel on disk instead of resolving a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= test,plots
STAMP  := $(VENV)/.pyroflows-installed

.PHONY: demo test test-slow bench lint clean

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

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS),bench]"
	$(BIN)/python benchmarks/vi_energies.py
	$(BIN)/python benchmarks/image_flows.py
	$(BIN)/python benchmarks/residual.py

lint: $(STAMP)
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check pyroflows tests benchmarks examples
	$(BIN)/ruff format --check pyroflows tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
