# One-command entry points. `make run` and `make test` work on a fresh machine: they create the
# virtual environment from the pinned constraints first.
SHELL := /bin/bash
comma := ,
# The first interpreter of the wanted version that actually runs (a pyenv shim may exist but not run).
find_python = $(shell for p in $(2) ; do if $$p -c 'import sys; sys.exit(sys.version_info[:2] != ($(1)))' >/dev/null 2>&1; then command -v $$p; break; fi; done)
PY311 ?= $(call find_python,3$(comma)11,python3.11 python3 $$HOME/.pyenv/versions/3.11*/bin/python3.11)
# Python 3.12 for the newest-JAX leg: on PATH, else any pyenv install.
PY312 ?= $(call find_python,3$(comma)12,python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12)
VENV ?= .venv
VENV312 ?= .venv312
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core; each holds 8 fake CPU devices. Whole test files stay on one
# worker (--dist loadfile), so module-scoped fixtures (trained tiny runs, compiled samplers) are built once.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST = -n $(TEST_WORKERS) --dist loadfile

.PHONY: setup setup312 tcmalloc run lint test test-fast test312 smoke results bench clean

# tcmalloc as the host allocator (gdsd_jax/allocator.py: XLA:CPU reuses its buffers instead of faulting in
# fresh pages every step; the CPU update step runs ~25% faster). Installed with apt when make runs as root on
# Debian/Ubuntu; otherwise a note says how, and everything still runs on the system allocator.
TCMALLOC_PKG := libtcmalloc-minimal4
tcmalloc:
	@if { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null | grep -q libtcmalloc; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(TCMALLOC_PKG) (host allocator, see gdsd_jax/allocator.py)"; \
	  { apt-get install -y -qq $(TCMALLOC_PKG) || { apt-get update -qq && apt-get install -y -qq $(TCMALLOC_PKG); }; } \
	    >/dev/null 2>&1 || echo "note: could not install $(TCMALLOC_PKG); running on the system allocator"; \
	else echo "note: no tcmalloc found; 'sudo apt-get install $(TCMALLOC_PKG)' makes CPU runs ~25% faster"; fi

$(VENV)/.installed: pyproject.toml requirements/constraints-py311.txt
	@test -n "$(PY311)" || (echo "Python 3.11 not found: set PY311=/path/to/python3.11" >&2; exit 1)
	$(PY311) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements/constraints-py311.txt -e ".[test,parity]"
	touch $@

$(VENV312)/.installed: pyproject.toml requirements/constraints-py312.txt
	@test -n "$(PY312)" || (echo "Python 3.12 not found: set PY312=/path/to/python3.12" >&2; exit 1)
	$(PY312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	$(VENV312)/bin/pip install -q -c requirements/constraints-py312.txt -e ".[test]"
	touch $@

setup: tcmalloc $(VENV)/.installed
setup312: tcmalloc $(VENV312)/.installed

## The main job: the embedded tiny default (4x4 Sudoku, SFT warm start then GDSD).
run: setup
	$(VENV)/bin/gdsd-jax train

## The linter (ruff: pyflakes, import order, line length; settings in pyproject.toml). `make test` runs it first.
lint: setup
	$(VENV)/bin/ruff check .

## The test suite (Python 3.11, pinned JAX, PyTorch parity tests included), after the linter.
test: setup lint
	$(VENV)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

## The inner loop: the suite without whole runs, multi-process, packaging and PyTorch-parity tests.
test-fast: setup
	$(VENV)/bin/python -m pytest $(XDIST) -m "not slow and not torch" $(PYTEST_ARGS)

## The same suite under Python 3.12 with the newest JAX/Flax (torch tests skip there).
test312: setup312
	$(VENV312)/bin/python -m pytest $(XDIST) $(PYTEST_ARGS)

smoke: setup
	$(VENV)/bin/gdsd-jax smoke

## GDSD vs the baselines on tiny Sudoku and Countdown (docs/results.md): lr selection, 3 seeds, clip study.
## Runs under runs/experiments/tiny_baselines; results.md and the PNGs into docs/results/.
## Resumes after an interruption; RESULTS_ARGS="--jobs 2" or "--dry-run" (planned runs + runtime estimate).
RESULTS_ARGS ?=
results: setup
	$(VENV)/bin/gdsd-jax experiment configs/experiments/tiny_baselines.yaml --results-dir docs/results $(RESULTS_ARGS)

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache
