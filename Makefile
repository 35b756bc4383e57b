# ckptd developer entry points. `make demo` and `make test` work on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, from the CPU wheel pinned here: a bare `torch` requirement would pull CUDA.
TORCH  ?= torch==2.13.0
# The mmcv layout's tests run a real mmcv 1.x runner. Its sdist builds only without build
# isolation (its setup.py imports torch) and with setuptools<81, so it is not in the test extra.
MMCV   ?= mmcv==1.7.2
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test,publish]'
	$(BIN)/pip install -q wheel "setuptools<81"
	MMCV_WITH_OPS=0 $(BIN)/pip install -q --no-build-isolation "$(MMCV)"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/ckptd demo

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/pytest -m "not slow and not trainer" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check ckptd tests benchmarks
	$(BIN)/ruff format --check ckptd tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_slim.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
