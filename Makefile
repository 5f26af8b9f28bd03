# Quick start: `make serve` (server on the default configuration) and `make test` (the whole suite).
# Both install first when needed: a venv in .venv with the pinned dependencies of pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install serve test lint format test-models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: install
	$(VENV)/bin/qwen-tts-server serve

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Tiny random checkpoints under ./models, for trying the server without real weights.
test-models: install
	$(VENV)/bin/qwen-tts-server make-test-models models

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
