# Two commands matter: `make quickstart` and `make test`. Both work on a fresh clone with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first so pip takes the CPU build on this disk instead of a multi-GB CUDA build;
# pyproject.toml asks only torch>=2.6, so GPU machines and the GPU image keep theirs. The base install
# (`pip install .`) is the API and the CLI, without torch; `.[train]` adds the worker, `.[serve]` the
# inference server, `.[dev]` both and the test tools.
TORCH := torch==2.13.0

.PHONY: install dev quickstart test lint bench gpu-wheels clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[train,serve]'

dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'

quickstart: install
	$(BIN)/python examples/quickstart.py

# Two pytest workers, a test file each at a time: the end-to-end tests spend most of their time waiting on
# other processes (start-up, leases, training steps), so two files at once fill the 2 cores' idle time.
# `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# mypy takes about a minute from a fresh clone (it reads torch's and transformers' types once), a few seconds
# once .mypy_cache holds them.
lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: dev
	$(BIN)/python -m bench inference

# Wheels for bench/gpu_check.sh on a GPU machine without internet (bench/wheels, at most 64 MiB; see README).
gpu-wheels: dev
	$(BIN)/python -m bench.gpu_wheels

clean:
	rm -rf $(VENV) .phitune .pytest_cache .ruff_cache .mypy_cache
