# Every target does its own set-up on a fresh machine: a .venv, a CPU build of torch, then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Pinned so that pip takes the CPU wheel on disk instead of resolving a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= test,plots
STAMP  := $(VENV)/.pyroflows-installed

.PHONY: demo test test-slow test-arviz1 print-python312 bench bench-quick docs lint clean

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

# The ArviZ-facing tests under ArviZ 1.x, which needs Python >= 3.12: in its own venv, with the first Python >= 3.12
# found (PYTHON312=... to choose one; pyenv's versions are looked at too). Fails when there is none.
PYTHON312 ?= $(firstword $(foreach p,$(shell command -v python3.14 python3.13 python3.12 2>/dev/null) \
                 $(sort $(wildcard $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3)),\
                 $(if $(shell $(p) -c 'import sys; print(sys.version_info >= (3, 12))' 2>/dev/null | grep True),$(p))))
VENV1  ?= .venv-arviz1
ARVIZ1_TESTS := tests/test_diagnostics.py tests/test_vi_models.py tests/test_examples_vi.py tests/test_docs_example.py \
                pyroflows/diagnostics.py pyroflows/_arviz_compat.py
print-python312:
	@echo $(PYTHON312)

test-arviz1:
	@test -n "$(PYTHON312)" || { echo "test-arviz1: no Python >= 3.12 found (set PYTHON312=...)"; exit 1; }
	test -x $(VENV1)/bin/python || $(PYTHON312) -m venv $(VENV1)
	$(VENV1)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV1)/bin/python -m pip install --quiet -e ".[$(EXTRAS)]" "arviz>=1"
	$(VENV1)/bin/python -c "import arviz, sys; assert arviz.__version__ >= '1', arviz.__version__; print('arviz', arviz.__version__, 'on Python', sys.version.split()[0])"
	$(VENV1)/bin/python -m pytest -q -p no:cacheprovider $(ARVIZ1_TESTS)

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
	rm -rf $(VENV) $(VENV1) build *.egg-info .pytest_cache docs/_build docs/api
