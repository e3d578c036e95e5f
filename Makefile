# make test          : build if needed, run the test suite (slow tests excluded; see test-all)
# make bench         : build if needed, time the headline case of every op family against every peer
#                      (minutes); results in bench/results/ only
# make bench-full    : every case of every family (tens of minutes)
# make bench-publish : copy the latest results into README.md and docs/bench/ (refused if the
#                      machine was busy during that run)
# Each target bootstraps .venv on first use: torch 2.13.0 (the CPU wheel on this kind of machine)
# unless the python3 that runs make already has a torch, which is then used as is. Tests install
# requirements/test.txt, benchmarks requirements/bench.txt as well (the packages kexue is timed against).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.9.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NATIVE_SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: test test-all lint bench bench-full bench-publish check-gpu check-cuda env clean

$(VENV)/.deps:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "kexue: using the torch already installed for $(PYTHON)"; \
	  $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) && $(PIP) install -q $(TORCH_SPEC); \
	fi
	$(PY) -c "import triton" 2>/dev/null || $(PIP) install -q $(TRITON_SPEC)
	$(PIP) install -q -r requirements/build.txt -r requirements/test.txt
	touch $@

$(VENV)/.bench-deps: $(VENV)/.deps requirements/bench.txt
	$(PIP) install -q -r requirements/bench.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install -q --no-build-isolation -e .
	touch $@

test: $(VENV)/.built
	$(PY) -m pytest -m "not slow" -q

test-all: $(VENV)/.built
	$(PY) -m pytest -q

lint: $(VENV)/.deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

check-gpu: $(VENV)/.built
	$(PY) tests/gpu_compile.py

check-cuda:
	bash .ci/check-cuda

bench: $(VENV)/.built $(VENV)/.bench-deps
	$(PY) -m bench

bench-full: $(VENV)/.built $(VENV)/.bench-deps
	$(PY) -m bench --full

bench-publish: $(VENV)/.built $(VENV)/.bench-deps
	$(PY) -m bench --publish

env: $(VENV)/.built
	$(PY) -m kexue.env

clean:
	rm -rf build python/kexue/*.so python/*.egg-info $(VENV)/.built
