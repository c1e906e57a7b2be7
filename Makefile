# nldsl: set-up and the two commands the README opens with.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test check fmt clean

# torch first and pinned: an open range would pull a multi-GB CUDA build. Then the package with
# triton: without a GPU the generated kernels' tests run in Triton's interpreter
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,triton]'
	touch $(STAMP)

setup: $(STAMP)

# the main job: check every shipped spec, draw Hope's level graph, then compile and train Hope,
# a Transformer and Gated DeltaNet on MQAR (the cpu-demo preset: Hope stops after 4.5 minutes)
demo: setup
	$(BIN)/nldsl check specs/*.nl
	$(BIN)/nldsl graph specs/hope.nl -o hope.png
	$(BIN)/nldsl run specs/hope.nl --out runs/demo/hope --overwrite
	$(BIN)/nldsl run specs/transformer.nl --out runs/demo/transformer --overwrite
	$(BIN)/nldsl run specs/gated_deltanet.nl --out runs/demo/gated_deltanet --overwrite
	@echo "level graph: hope.png; curves, metrics and checkpoints: runs/demo/*/"

# on every core (pytest-xdist): about 3 minutes on 2 cores instead of 5
test: setup
	$(BIN)/python -m pytest -n auto

check: setup
	$(BIN)/nldsl check specs/*.nl
	$(BIN)/nldsl fmt --check specs/*.nl

clean:
	rm -rf $(VENV) build dist *.egg-info hope.png runs/demo
