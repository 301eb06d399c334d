# Two commands do everything on a fresh machine:
#   make run    set up .venv, then run notebooks 01 -> 02 -> 03 headless (PROFILE=minilm by default)
#   make test   set up .venv, check it matches the lock, then run the whole test suite (unit tests + nbval)
# The set-up installs exactly requirements.lock (versions and hashes, the CPU build of torch included).
#   make lock   regenerate requirements.lock on purpose from pyproject.toml and requirements.in
#   make sync   reinstall the lock into an existing .venv (what the drift guard of `make test` asks for)
# A GPU user swaps the torch build with one variable, e.g.
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# Optional extras are locked on their own, requirements-<name>.lock (hashes; never in requirements.lock):
#   make extras EXTRA=base    install one into .venv (base: the five packages of the base profile's teacher)
# A profile that needs extras installs them before its run: PROFILE_EXTRAS_<profile> lists them, e.g.
#   make run PROFILE=base     installs requirements-base.lock first; EXTRAS="a b" adds any to a run.

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
PROFILE_EXTRAS_base := base
EXTRAS     ?= $(PROFILE_EXTRAS_$(PROFILE))

.PHONY: setup sync lock run test lint nbval-refs clean extras

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

# An extra's lock lists every package it installs (--no-deps, as for the main lock); a stamp per extra.
$(VENV)/.kdlib-extra-%: requirements-%.lock $(STAMP)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $<
	touch $@

extras:  # the name is checked before any set-up work
	@test -n "$(EXTRA)" || { echo "make extras EXTRA=<name> installs requirements-<name>.lock, e.g. EXTRA=base"; exit 2; }
	@test -f requirements-$(EXTRA).lock || { echo "no requirements-$(EXTRA).lock: no extra named $(EXTRA)"; exit 2; }
	$(MAKE) $(VENV)/.kdlib-extra-$(EXTRA)

run: setup $(foreach extra,$(EXTRAS),$(VENV)/.kdlib-extra-$(extra))
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
