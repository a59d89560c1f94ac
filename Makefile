# Two commands do all the set-up: `make figures` (the main job) and `make test` (lint + tests).
# TORCH pins the PyTorch build. The default takes the CPU build on a CPU machine with the pinned file;
# on a GPU machine install your CUDA build of torch first (README), and this line leaves it in place.
PY ?= python3
TORCH ?= torch==2.13.0
# verl for the parity tests, without its dependencies (pyproject.toml's `parity` extra says why and lists
# the few it needs); every install names TORCH so that nothing replaces the pinned torch build.
VERL ?= verl==0.9.1

.PHONY: setup figures test test-slow

setup:
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(VERL)"

figures: setup
	$(PY) -m experiments.cli figures

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow
