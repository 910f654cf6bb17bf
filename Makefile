# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export HF_HUB_OFFLINE ?= 1
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

## Serve the embedded tiny model on CPU at 127.0.0.1:8000.
run: $(STAMP)
	env -u QWEN_MODEL_DIR $(PY) -m serve_app.launch deploy/local.yaml

## Lint, type-check, then the CPU test suite (GPU tests skip with a reason).
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy serve_app

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
