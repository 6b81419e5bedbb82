# botaclip — two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU wheel for machines without CUDA; GPU users install their own torch build first
TORCH_CPU := torch==2.13.0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
PORT   ?= 4200
# test processes for `make test` (most tests run one core's worth of Python); 0 runs in-process
TEST_WORKERS ?= 2
# apt-get needs root: sudo when we are not
SUDO   := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: demo demo-tiny test test-slow test-ui lint bench server clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.stamp-install: pyproject.toml | $(PY)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then echo "CUDA found: installing torch from PyPI"; $(PY) -m pip install torch; \
	  else $(PY) -m pip install $(TORCH_CPU); fi; fi
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-install
	$(PY) -m pip install -e '.[test]'
	touch $@

demo: $(VENV)/.stamp-install
	$(VENV)/bin/botaclip demo --workdir botaclip-demo

demo-tiny: $(VENV)/.stamp-install
	$(VENV)/bin/botaclip demo --workdir botaclip-demo-tiny --size tiny

test: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-slow: $(VENV)/.stamp-test
	$(PY) -m pytest -q -m slow

$(VENV)/.stamp-ui: $(VENV)/.stamp-test
	$(PY) -m pip install -e '.[test,ui]'
	touch $@

# the Prefect UI in headless Chromium: Debian's chromium package, driven by Playwright
test-ui: $(VENV)/.stamp-ui
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }
	BOTACLIP_CHROMIUM="$$(command -v chromium)" $(PY) -m pytest -q -m ui -p no:randomly
	@echo "screenshots: build/ui-screenshots/"

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(VENV)/.stamp-install
	$(PY) benchmarks/bench_tiling.py --repeat 3
	$(PY) benchmarks/bench_tiling.py --repeat 2 --sources reprojected
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_sample.py

server: $(VENV)/.stamp-install
	$(VENV)/bin/botaclip server --port $(PORT)

clean:
	rm -rf botaclip-demo botaclip-demo-tiny .pytest_cache
