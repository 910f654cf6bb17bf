# Two commands on a fresh machine: `make run` and `make test` (`make test-all` for every suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# torchao (the fp8 extra, not installed by `make install`) ships C++ kernels built for one torch
# (0.17: 2.11); a CPU environment never runs FP8 (refused without a GPU), so never load them here.
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES ?= 1

.PHONY: install run test test-integration test-all lint typecheck clean

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

## The tests in two suites, by the pytest markers in pyproject.toml (tests/deploy/test_suites.py
## checks that every test file is in exactly one):
## `make test`: lint, type-check, then every test that needs no Ray cluster, no process group and
## no package registry (minutes on 2 cores; GPU tests skip with a reason);
## `make test-integration`: the real Ray Serve app over HTTP (`integration`), the transformer
## over several torch.distributed ranks (`multiprocess`) and the install resolved against PyPI
## (`network`);
## `make test-all`: both (what CI runs).
# The tests never reach the Hugging Face Hub. (`make run` may: a config can name a model id, and
# HF_HUB_OFFLINE from the environment or .env applies there.)
SLOW_MARKERS := integration or multiprocess or network
PYTEST := $(PY) -m pytest -q -ra

# The fast suite on every core (pytest-xdist; `TEST_WORKERS=0` runs it in one process). A test
# file stays on one worker, so its module fixtures are built once; the workers share only the
# tiny models' cache folder, which is published atomically (pipeline/random_weights/tiny.py).
TEST_WORKERS ?= auto
test: export HF_HUB_OFFLINE ?= 1
test: $(STAMP) lint typecheck
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile -m "not ($(SLOW_MARKERS))"

test-integration: export HF_HUB_OFFLINE ?= 1
test-integration: $(STAMP)
	$(PYTEST) -m "$(SLOW_MARKERS)"

test-all: test test-integration

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy serve_app

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
