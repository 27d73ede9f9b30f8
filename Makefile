# hyperrec: every target installs .venv from the lock file on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast bench lock stack-up stack-down clean help

help:
	@echo "make demo   - install (first time), then run the nightly pipeline on ml-100k + synthetic and serve"
	@echo "make test   - install (first time), then run the whole test suite"
	@echo "make bench  - run the benchmarks under bench/ (results in docs/benchmarks.md)"
	@echo "make lock   - re-resolve pyproject.toml into requirements.lock"

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) hyperrec/prereqs.py
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first time: about 3 minutes)..."
	@$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	@$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	@$(BIN)/pip check >/dev/null || ($(BIN)/pip check; exit 1)
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/hyperrec demo --config config/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/feature_store.py

# Re-resolve the lock after editing pyproject.toml dependencies.
lock:
	rm -rf /tmp/hyperrec-lock && $(PYTHON) -m venv /tmp/hyperrec-lock
	/tmp/hyperrec-lock/bin/pip install --quiet "pip==26.3"
	/tmp/hyperrec-lock/bin/pip install --quiet ".[test]"
	/tmp/hyperrec-lock/bin/pip freeze --all --exclude hyperrec --exclude pip | sort > requirements.lock

stack-up:
	docker compose -f docker/compose.yaml up -d --build

stack-down:
	docker compose -f docker/compose.yaml down

clean:
	rm -rf .hyperrec .pytest_cache
