# Two commands do everything on a fresh machine: `make demo` and `make test`.
# `make test-fast` gives a signal in minutes while working (see the target).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools demo test test-fast lint format bench faults docs dist-check compat clean

# torch 2.13.0 first: it resolves to the local CPU wheel. An unpinned torch would pull a
# multi-GB CUDA build; with 2.13.0 installed, the package's `torch>=2.7,<2.16` adds nothing.
$(STAMP): pyproject.toml mlflow_ckpt/codec/_planes.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Azurite (the Azure Blob emulator) for the storage tests; pinned: newer ones want Node >= 21.
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3.35.0

tools: $(AZURITE)

demo: install
	$(BIN)/python examples/train_and_resume.py

# pytest-xdist workers: one per core, at most 4 (a multi-process test runs 2-3 processes of its
# own). --dist loadgroup keeps each xdist_group on one worker: tests sharing one job or one
# PostgreSQL server (tests/test_distributed.py, test_elastic.py, test_scale.py...). With
# pytest 9.2 and xdist 3.8 it does not (pytest-xdist#1386: it schedules as `load`); nothing
# depends on it for correctness, a shared job then runs once per worker that needs it.
WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)
PYTEST_XDIST := -n $(WORKERS) --dist loadgroup

# The whole suite; CI runs it (.ci/run).
test: install tools lint
	$(BIN)/pytest $(PYTEST_XDIST)

# No multi-process job and no server (the `slow` and `servers` marks; tests/conftest.py adds
# them from the fixtures a test uses): what most edits break, in minutes. Not a substitute
# for `make test`.
test-fast: install
	$(BIN)/pytest $(PYTEST_XDIST) -m "not slow and not servers"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every speed, memory and MLflow-cost figure in one run (benchmarks/suite.py; add
# ARGS=--quick for a few minutes: `make bench ARGS=--quick`).
bench: install
	$(BIN)/python benchmarks/suite.py $(ARGS)

# N trials of every fault in docs/guarantees.md (needs root for the tmpfs one).
faults: install
	$(BIN)/python benchmarks/faults.py

# The docs site at http://127.0.0.1:8000 (mkdocs serve; `mkdocs build --strict` runs in lint).
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# The sdist and the wheel built, checked (twine), installed into fresh venvs with runtime
# dependencies only (the sdist with no C compiler) and the quickstart run from outside the
# repo (.ci/wheel says how). Its own venvs: it needs no `make install`.
dist-check:
	bash .ci/wheel

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache mlruns mlflow.db

# The compatibility lane: tests/compat_subset.txt on the oldest declared and the newest
# installable torch and MLflow, each pair in a venv of its own under .venv-compat/
# (.ci/compat says how; `.ci/compat --torch T --mlflow M` runs one pair).
compat:
	PYTHON=$(PYTHON) .ci/compat
