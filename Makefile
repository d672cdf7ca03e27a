# Phalanx developer entry points. Everything runs from the project's virtualenv (.venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PHALANX := $(VENV)/bin/phalanx

.PHONY: help venv install test test-unit lint format crds dev-build demo demo-fake images operator demo-down bench bench-scale clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip

venv: $(PY)  ## Create the virtualenv

install: $(PY)  ## Install Phalanx with every extra (torch is large: pip keeps it cached)
	$(VENV)/bin/pip install -e '.[train,serve,dev]'

test: $(PY)  ## Run the whole test suite (unit, integration on the local control plane, e2e)
	$(PY) -m pytest

test-unit: $(PY)  ## Run the unit tests only (no control plane needed)
	$(PY) -m pytest tests/unit

lint: $(PY)  ## ruff + mypy (strict on operator/phalanx) + CRD drift check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy operator/phalanx
	$(VENV)/bin/mypy images/trainer/phalanx_trainer images/inference/phalanx_serve
	$(VENV)/bin/lint-imports

format: $(PY)  ## Format the code
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

crds: $(PY)  ## Regenerate crds/ (and the chart's copy) from the API models
	$(PHALANX) crds
	cp crds/*.yaml charts/phalanx/files/crds/

dev-build: $(PY)  ## Build the local control plane binaries (cached under ~/.cache/phalanx/bin)
	$(PHALANX) dev build

demo: $(PY)  ## Train jobs/tiny-cpu.yaml on 2 real nodes through the operator, serve it, print a completion
	$(PHALANX) dev demo

demo-fake: dev-build  ## Start the control plane with 64 fake H100 nodes (kwok), install the CRDs, show the nodes
	$(PHALANX) dev up
	@eval "$$($(PHALANX) dev env)"; kubectl=$$(ls $(HOME)/.cache/phalanx/bin/*/kubectl | tail -1); \
	  $$kubectl apply --server-side -f crds/ >/dev/null && \
	  $$kubectl get nodes -L phalanx.dev/rack,nvidia.com/gpu.product,nvidia.com/gpu.clique | head -12 && \
	  echo "... $$($$kubectl get nodes --no-headers | wc -l) nodes"
	@echo "Next: 'make operator' in another terminal, then: kubectl apply -f jobs/gpt2-124m-h100.yaml; kubectl get ltj"

images: $(PY)  ## Build the operator, trainer and inference images from images/*/Dockerfile (buildah, cached)
	$(PHALANX) dev images

operator: $(PY)  ## Run the operator against the local control plane
	$(PHALANX) dev exec -- $(PHALANX) operator run

demo-down:  ## Stop the local control plane
	$(PHALANX) dev down

bench: $(PY)  ## Run the benchmarks; results land in bench/results/
	$(PY) bench/run_all.py

bench-scale: $(PY)  ## Gang admission at 1,000 and 5,000 nodes: builtin, kube-scheduler, Kueue TAS, API ceiling
	$(PHALANX) dev build --with kueue
	$(PY) bench/scale.py --nodes 1000
	$(PY) bench/scale.py --nodes 5000

clean:  ## Remove caches (not the virtualenv)
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis
