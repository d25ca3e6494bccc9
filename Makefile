# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: the machine's local CPU wheel. Letting pip choose torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-slow lint venv install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e ".[dev]"

demo: install
	$(BIN)/roe generate "To be, or not to be" --max-new-tokens 40

test: install-dev
	$(BIN)/ruff check roe tests benchmarks
	$(BIN)/python -m pytest -q

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow

lint: install-dev
	$(BIN)/ruff check roe tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
