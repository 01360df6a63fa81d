# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install tools demo test lint format bench faults clean

# torch 2.13.0 first: it resolves to the local CPU wheel. An unpinned torch would pull a
# multi-GB CUDA build; with 2.13.0 installed, the package's `torch>=2.6` adds nothing.
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

test: install tools lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every speed, memory and MLflow-cost figure in one run (benchmarks/suite.py --quick: minutes).
bench: install
	$(BIN)/python benchmarks/suite.py

# N trials of every fault in the README's Guarantees section (needs root for the tmpfs one).
faults: install
	$(BIN)/python benchmarks/faults.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache mlruns mlflow.db
