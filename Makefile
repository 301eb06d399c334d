# Two commands do everything on a fresh machine:
#   make run    set up .venv, then run notebooks 01 -> 02 -> 03 headless (PROFILE=minilm by default)
#   make test   set up .venv, then run the whole test suite (unit tests + nbval)
# A GPU user swaps the torch build with one variable, e.g.
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PROFILE    ?= minilm
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.kdlib-installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup run test lint nbval-refs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: setup
	$(BIN)/python -m kdlib.run --profile $(PROFILE)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check kdlib tests benchmarks scripts notebooks

# Regenerate the smoke-profile reference notebooks that nbval compares against (see README).
nbval-refs: setup
	$(BIN)/python -m kdlib.run --profile smoke --into tests/nbval

clean:
	rm -rf outputs/smoke outputs/checkpoints outputs/models
