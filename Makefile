# LLM Systems Lab. Two commands on a fresh machine (Python 3.11+, pip, make):
#   make lab    set up .venv and open the course in JupyterLab
#   make test   set up .venv and run the whole CPU suite (unit tests, then every chapter under nbval)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Inductor's cache makes the second compile of the same graph take seconds instead of ~20 s.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
LAB_ARGS ?=
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: lab test unit notebooks gpu clean

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	@echo "installing labkit and its dependencies into $(VENV) (first time: a few minutes)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' 2>&1 | { grep -v '^WARNING: Location' || true; }
	@touch $@

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) --ServerApp.root_dir=$(CURDIR) \
	  --ServerApp.default_url=/lab/tree/notebooks/00-start.ipynb $(LAB_ARGS)

test: unit notebooks

unit: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow"

notebooks: $(STAMP)
	$(VENV)/bin/labkit validate

# On the GPU runner (see README): every gpu test, every chapter under nbval, every benchmark.
gpu:
	bash tools/gpu-suite.sh

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis *.egg-info
