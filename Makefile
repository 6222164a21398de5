# The two commands a newcomer needs:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install k8s image pods lint unit bench clean

demo: install  ## the standalone proxy in front of a rate-limited fake provider, one command
	$(BIN)/sideproxy demo

test: install k8s lint  ## everything: lint, types, layers, unit, proxy, operator, chart, e2e, pods
	$(BIN)/python -m pytest

install: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

k8s:  ## build (or reuse from ~/.cache/sideproxy-k8s) etcd, the control plane, the node, kubectl, helm
	bash scripts/build-k8s.sh

image:  ## build (or reuse from ~/.cache/sideproxy-image) the image from the Dockerfile, with podman
	bash scripts/build-image.sh

pods: install k8s  ## only the tests that build the image and run the chart's pods (needs root)
	$(BIN)/python -m pytest -m pods

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: install  ## the fast tests that need no cluster
	$(BIN)/python -m pytest -m "not kube and not pods"

bench: install
	bash bench/run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
