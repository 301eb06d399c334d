# Two commands do everything on a fresh machine:
#   make run    set up .venv, then run notebooks 01 -> 02 -> 03 headless (PROFILE=minilm by default)
#   make test   set up .venv, check it matches the lock, then run the whole test suite (unit tests + nbval)
# The set-up installs exactly requirements.lock (versions and hashes, the CPU build of torch included).
#   make lock   regenerate requirements.lock on purpose from pyproject.toml and requirements.in
#   make sync   reinstall the lock into an existing .venv (what the drift guard of `make test` asks for)
# A GPU user swaps the torch build with one variable, e.g.
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?=
PROFILE    ?= minilm
LOCK       := requirements.lock
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.kdlib-installed
export PATH := $(abspath $(BIN)):$(PATH)
# With another torch build, the lock is installed without its torch entry and the guard skips torch.
GUARD_SKIP := $(if $(TORCH_SPEC),--skip torch,)

.PHONY: setup sync lock run test lint nbval-refs clean

setup: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(TORCH_SPEC),)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
else
	$(BIN)/python scripts/check_lock.py --without torch > $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/lock-without-torch.txt
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
endif
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

sync:
	rm -f $(STAMP)
	$(MAKE) setup

lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/pip-compile || $(BIN)/python -m pip install --quiet pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --extra dev --extra postgres \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) pyproject.toml requirements.in

run: setup
	$(BIN)/python -m kdlib.run --profile $(PROFILE)

test: setup
	$(BIN)/python scripts/check_lock.py $(GUARD_SKIP)
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check kdlib tests benchmarks scripts notebooks

# Regenerate the smoke-profile reference notebooks that nbval compares against (see README).
nbval-refs: setup
	$(BIN)/python -m kdlib.run --profile smoke --into tests/nbval

clean:
	rm -rf outputs/smoke outputs/checkpoints outputs/models
