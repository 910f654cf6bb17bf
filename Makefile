# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# torchao (the fp8 extra, not installed by `make install`) ships C++ kernels built for one torch
# (0.17: 2.11); a CPU environment never runs FP8 (refused without a GPU), so never load them here.
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES ?= 1

.PHONY: install run test lint typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[serve,lora,test]'
	touch $(STAMP)

## Serve CONFIG (default: the embedded tiny model on CPU at 127.0.0.1:8000), with the settings
## of ./.env (or ENV_FILE). `make run PORT=8001` picks another port. Ctrl-C or SIGTERM stops
## Serve and the Ray it started. `exec`: the launcher is make's child, the one it signals.
CONFIG ?= deploy/local.yaml
run: $(STAMP)
	exec $(PY) -m serve_app.launch $(CONFIG) $(if $(PORT),--port $(PORT)) \
		$(if $(ENV_FILE),--env-file $(ENV_FILE))

## Lint, type-check, then the CPU test suite (GPU tests skip with a reason).
# The tests never reach the Hugging Face Hub. (`make run` may: a config can name a model id, and
# HF_HUB_OFFLINE from the environment or .env applies there.)
test: export HF_HUB_OFFLINE ?= 1
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy serve_app

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
