# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# With no torch and no NVIDIA GPU, take the CPU build from PyTorch's CPU index (PyPI's `torch`, pinned or not,
	@# is the multi-GB CUDA build on Linux); where that index is out of reach (one retry, not pip's five: ~75 s
	@# of waiting offline), the pin from pip's own index.
	@$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu --retries 1 --timeout 15 || \
	    $(PY) -m pip install -q torch==2.13.0; fi; }
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/nanoseek demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) bench/train_vs_hf.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
