# make demo | make test | make bench -- each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/longcap run configs/demo.yaml
	$(BIN)/longcap eval-pairs runs/demo
	$(BIN)/longcap eval runs/demo/models/caft-tiny synthetic --run runs/demo
	$(BIN)/longcap report runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs/demo .pytest_cache
