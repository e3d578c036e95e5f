# make test   : build if needed, run the whole test suite (slow tests excluded; see test-all)
# make bench  : build if needed, run the benchmark suite on whatever device is present
# Each target bootstraps .venv on first use: torch 2.13.0 (the CPU wheel on this kind of machine)
# unless the python3 that runs make already has a torch, which is then used as is.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' 2>/dev/null)

.PHONY: test test-all bench check-gpu check-cuda env clean

$(VENV)/.deps:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "kexue: using the torch already installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PIP) install -q $(TORCH_SPEC); \
	fi
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q $(TRITON_SPEC)
	$(PIP) install -q setuptools wheel pybind11 ninja numpy pytest hypothesis matplotlib tqdm lion-pytorch pytorch-optimizer transformers flyvec
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

test: $(VENV)/.built
	$(PY) -m pytest -m "not slow" -q

test-all: $(VENV)/.built
	$(PY) -m pytest -q

check-gpu: $(VENV)/.built
	$(PY) tests/gpu_compile.py

check-cuda:
	bash .ci/check-cuda

bench: $(VENV)/.built
	$(PY) -m bench

env: $(VENV)/.built
	$(PY) -m kexue.env

clean:
	rm -rf build python/kexue/*.so python/*.egg-info $(VENV)/.built
