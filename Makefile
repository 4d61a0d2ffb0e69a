# umarvel-kit: two commands do everything on a fresh machine.
#   make reproduce [PRESET=cpu|smoke|gpu]   set-up + the whole reproduction, writing results/<preset>/
#   make test                               set-up + lint + the fast test suite (-m "not slow", ~5 min)
#   make test-all                           set-up + lint + every test (slow ones included; what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PRESET ?= cpu
JOBS   ?= $(shell nproc 2>/dev/null || echo 1)
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup reproduce lint format-check test test-all lab bench clean-cache

setup: $(STAMP)

# torch: keep any torch already importable in the venv (e.g. your own CUDA build); otherwise the
# CPU wheel 2.13.0 on a machine without nvidia-smi, and the default (CUDA) build where a GPU is present.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || { \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q torch; \
	  else $(PIP) install -q torch==2.13.0; fi; }
	$(PIP) install -q -e '.[dev]'
	$(PY) -m ipykernel install --prefix $(VENV) --name umarvel-kit --display-name "umarvel-kit" >/dev/null
	touch $(STAMP)

reproduce: $(STAMP)
	$(VENV)/bin/umarvel reproduce --preset $(PRESET) --jobs $(JOBS)

# ruff (configured in pyproject.toml): lint rules and the formatter's layout (`ruff format .` fixes it)
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format-check: $(STAMP)
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -m "not slow"

test-all: lint
	$(PY) -m pytest -q -m ""

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

bench: $(STAMP)
	$(PY) bench/step.py
	$(PY) bench/search.py
	$(PY) bench/encode.py
	$(PY) bench/train.py --memory
	$(PY) bench/caption_probe.py --path $$($(VENV)/bin/umarvel backbone | sed -n 's/.*: \(.*\) (digest .*/\1/p')

clean-cache:
	rm -rf cache data
