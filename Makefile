# DiG pretraining system. `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, as TORCH_SPEC from TORCH_INDEX (default: pip's configured index; on Linux PyPI serves
# the CUDA build). Every later install is constrained to it, so the resolver never swaps in another build (and
# ~18 GB of nvidia wheels). CPU-only machine: `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= test
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=
# launch / preprocess: CONFIG is the YAML for the target, ARGS extra `key=value` overrides or job flags;
# DRY_RUN=1 prints the command instead of running it. Cluster settings (HOSTFILE, NNODES, NODE_RANK,
# MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE, RAY_ADDRESS, MLFLOW_TRACKING_URI, AWS_*) come from the environment
# or the make command line.
CONFIG ?=
ARGS ?=
INPUT ?=
OUTPUT ?=
DRY_RUN ?=
MLFLOW_PORT ?= 5000
DEMO_OUT ?= demo_out

.PHONY: help install test test-fast demo launch preprocess mlflow-ui check-venv
help:
	@echo "make install    create $(VENV) and install dig (torch pinned: $(TORCH_SPEC); CPU-only wheel:"
	@echo "                TORCH_INDEX=https://download.pytorch.org/whl/cpu)"
	@echo "make test       install if needed, then run the test suite"
	@echo "make test-fast  the suite without the multi-process/server tests (-m 'not slow')"
	@echo "make demo       install if needed, then the whole job on this machine (images -> Ray latents ->"
	@echo "                train -> checkpoint -> sample grid, all in the local MLflow store) into $(DEMO_OUT)/"
	@echo "make launch CONFIG=configs/train/<run>.yaml [ARGS='key=value ...'] [DRY_RUN=1]"
	@echo "                train on this node / NNODES nodes (torchrun) or a HOSTFILE (DeepSpeed launcher)"
	@echo "make preprocess INPUT=<images> OUTPUT=<shards> [CONFIG=configs/preprocess/<x>.yaml] [ARGS=...]"
	@echo "                the Ray latent job on RAY_ADDRESS (or a local loopback Ray started and stopped here)"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:$(MLFLOW_PORT) over MLFLOW_TRACKING_URI or sqlite:///mlflow.db"

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c constraints.txt -c $(VENV)/torch-constraint.txt -e ".[$(EXTRAS)]"
	touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

check-venv:
	@test -x $(PY) || { echo "error: no $(VENV) here; run \`make install\` first" >&2; exit 1; }

demo: install
	$(PY) -m launch.demo --out "$(DEMO_OUT)"

launch: check-venv
	$(PY) -m launch.train --config "$(CONFIG)" $(if $(DRY_RUN),--dry-run) -- $(ARGS)

preprocess: check-venv
	$(PY) -m launch.preprocess $(if $(INPUT),--input "$(INPUT)") $(if $(OUTPUT),--output "$(OUTPUT)") \
		$(if $(CONFIG),--config "$(CONFIG)") $(if $(DRY_RUN),--dry-run) -- $(ARGS)

mlflow-ui: check-venv
	$(PY) -m launch.mlflow_ui --port $(MLFLOW_PORT) $(if $(DRY_RUN),--dry-run)
