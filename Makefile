# ENSAM for 3D Slicer: one environment (.venv) for the CLI, the tests and the browser app.
#   make setup   create .venv and install pinned dependencies (quick when already done)
#   make demo    `ensam demo`: segment the bundled sample CT from its box and click, write a labelmap,
#                an overlay PNG and report.json to demo-output/ (says so when the model is untrained)
#   make test    run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ensam-setup-done
OUTDIR ?= demo-output
# The default model: the trained file registered in ENSAMSegment/Resources/Models/models.json
# (`ensam models register`, committed). Until one is registered, setup writes a deterministic, clearly
# labelled untrained placeholder here (git-ignored) so that every front-end runs end to end; once a
# default is registered, setup never writes a model (and says so when the registered file is missing).
DEFAULT_MODEL := ENSAMSegment/Resources/Models/ensam-default.pt

.PHONY: setup demo test lint clean

setup: $(STAMP) $(DEFAULT_MODEL)

$(DEFAULT_MODEL): | $(STAMP)
	$(PY) -m ENSAMSegmentLib.core.modelfile

$(STAMP): pyproject.toml .ci/constraints.txt .ci/install-system-packages Makefile
	bash .ci/install-system-packages
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU wheel, so that no resolver pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c .ci/constraints.txt -e '.[slicer,web,test]'
	$(PY) -c "import torch, monai, SimpleITK, slicer; print('environment ready: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ensam demo --out $(OUTDIR)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check ENSAMSegment ENSAMTraining Testing

clean:
	rm -rf $(VENV) $(OUTDIR) .pytest_cache
