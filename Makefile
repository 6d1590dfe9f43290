# DiG pretraining system. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines take the local CPU wheel of this torch; every later install is constrained to it so the
# resolver never swaps in a CUDA build (and ~18 GB of nvidia wheels). On a GPU cluster set TORCH_SPEC to the
# CUDA build you want, e.g. `make install TORCH_SPEC=torch==2.13.0 EXTRAS=test,gpu`.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=

.PHONY: help install test test-fast
help:
	@echo "make install    create $(VENV) and install dig (torch pinned: $(TORCH_SPEC))"
	@echo "make test       install if needed, then run the test suite"
	@echo "make test-fast  the suite without the multi-process/server tests (-m 'not slow')"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
