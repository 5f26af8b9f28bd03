# Quick start: `make serve` (server on the default configuration) and `make test` (the whole suite).
# Both install first when needed: a venv in .venv with the pinned dependencies of pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp

.PHONY: install browser serve test test-gpu lint docker-check format test-models clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

serve: install
	$(VENV)/bin/qwen-tts-server serve

test: install browser
	$(PY) -m pytest -q

# The GPU tier (tests/gpu; README "GPU tests"): graph replay vs eager, teacher-forced bf16 parity with upstream,
# streamed vs whole audio, memory at unload, no recompiles after warm-up. Needs CUDA; writes the full-size random
# 1.7B checkpoint to QTTS_GPU_TEST_MODELS (default /tmp/models) first. Without the venv: make test-gpu PY=python3
test-gpu: $(if $(filter $(VENV)/bin/python,$(PY)),install)
	PY=$(PY) bash bench/gpu_tests.sh

# The web page's browser tests (tests/web) drive Debian's Chromium; Playwright never downloads a browser here.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no $(CHROMIUM): the browser tests (tests/web) skip; as root: apt-get install chromium"; fi

lint: install docker-check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The Docker files without a Docker engine: hadolint on the Dockerfile, and Docker Compose's own `config`,
# which validates compose.yaml against the Compose specification (both come as wheels in the dev extra;
# `docker compose` where the venv has no docker-compose binary).
docker-check: install
	$(VENV)/bin/hadolint docker/Dockerfile
	@compose=$(VENV)/bin/docker-compose; [ -x "$$compose" ] || compose="docker compose"; \
	echo "$$compose -f compose.yaml config --quiet"; $$compose -f compose.yaml config --quiet
	bash -n docker/install.sh
	bash -n docker/check-install.sh
	@echo "docker-check: docker/Dockerfile and compose.yaml are valid"

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Tiny random checkpoints under ./models, for trying the server without real weights.
test-models: install
	$(VENV)/bin/qwen-tts-server make-test-models models

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
