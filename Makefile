# hyperrec: every target installs .venv from the lock file on first use.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the tests need beyond Python: chromium (browser tests, /usr/bin/chromium)
# and prometheus (promtool checks the alert rules). `make demo` needs neither.
SYSTEM_PACKAGES := chromium prometheus
SYSTEM_STAMP    := $(VENV)/.system-packages
CHROMIUM        := /usr/bin/chromium
# torch is the CPU build: a wheel from pip's own sources when they hold one (find-links),
# else this index. PyPI's Linux wheel of the same version requires GBs of CUDA packages.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_QUIET   := --quiet --disable-pip-version-check
PYTEST_ARGS ?=
# Arguments passed through to `hyperrec up|down|status`, e.g. ARGS="--config config/stack.yaml".
ARGS ?=

.PHONY: install system-packages demo lint test test-fast up down status bench lock stack-up stack-down clean help

help:
	@echo "make demo    - install (first time), then run the nightly pipeline on ml-100k + synthetic and serve"
	@echo "make lint    - ruff (lint + format check), mypy (core/, serving/) and the import layers (lint-imports)"
	@echo "make test    - install (first time, plus Debian's chromium and prometheus), then make lint and the whole test suite"
	@echo "make test-fast - make lint, then the unit tests (no Spark, servers or subprocesses; under 2 minutes)"
	@echo "make up      - start the services (Airflow, MLflow, serving, Valkey/Redis), supervised: hyperrec up \$$(ARGS)"
	@echo "make status  - state and health of the services started by make up: hyperrec status \$$(ARGS)"
	@echo "make down    - stop the services started by make up: hyperrec down \$$(ARGS)"
	@echo "               e.g. make up ARGS=\"--config config/stack.yaml\""
	@echo "make bench   - run the benchmarks under bench/ (results in docs/benchmarks.md)"
	@echo "make lock    - re-resolve pyproject.toml into requirements.lock"
	@echo "make stack-up / stack-down - the same services in Docker Compose (docker/compose.yaml)"

$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) hyperrec/prereqs.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (first time: about 4 minutes)..."
	@$(BIN)/pip install $(PIP_QUIET) --upgrade "pip==26.3" 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@torch="$$(grep -E '^torch==' requirements.lock)"; \
	  $(BIN)/pip install $(PIP_QUIET) --no-deps --no-index "$$torch" 2>/dev/null \
	  || $(BIN)/pip install $(PIP_QUIET) --no-deps --index-url $(TORCH_INDEX) "$$torch"
	@$(BIN)/pip install $(PIP_QUIET) --no-deps -r requirements.lock 2>&1 | { grep -v "is ignored: it is neither" || true; }
	@$(BIN)/pip install $(PIP_QUIET) --no-deps -e .
	@$(BIN)/pip check >/dev/null || ($(BIN)/pip check; exit 1)
	@touch $(STAMP)

install: $(STAMP)

# Installs $(SYSTEM_PACKAGES) with apt-get (sudo when not root) only when $(CHROMIUM)
# or promtool is missing; the stamp keeps later runs from checking again.
$(SYSTEM_STAMP):
	@if [ -x $(CHROMIUM) ] && command -v promtool >/dev/null 2>&1; then :; else \
	  fail() { echo "hyperrec: $$1. The tests need Debian's $(SYSTEM_PACKAGES) ($(CHROMIUM), promtool):" \
	    "install them (sudo apt-get install --no-install-recommends $(SYSTEM_PACKAGES)), then run make again" >&2; exit 1; }; \
	  command -v apt-get >/dev/null 2>&1 || fail "apt-get not found"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; \
	  else fail "not root and no sudo"; fi; \
	  apt_install() { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); }; \
	  echo "installing Debian packages for the tests: $(SYSTEM_PACKAGES)..."; \
	  apt_install || { $$sudo apt-get update && apt_install; } || fail "apt-get could not install them"; \
	  [ -x $(CHROMIUM) ] || fail "$(CHROMIUM) is still missing after apt-get install"; \
	  command -v promtool >/dev/null 2>&1 || fail "promtool is still missing after apt-get install"; \
	fi
	@mkdir -p $(dir $(SYSTEM_STAMP)) && touch $(SYSTEM_STAMP)

system-packages: $(SYSTEM_STAMP)

demo: $(STAMP)
	$(BIN)/hyperrec demo --config config/demo.yaml

# Code checks: lint and format (ruff), types of the foundation and the serving tier (mypy),
# and the layer contract of pyproject.toml [tool.importlinter] (lint-imports).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint $(SYSTEM_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/unit only: no Spark session, server or interpreter subprocess (tests/unit/conftest.py refuses them).
test-fast: lint
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

up: $(STAMP)
	$(BIN)/hyperrec up $(ARGS)

down: $(STAMP)
	$(BIN)/hyperrec down $(ARGS)

status: $(STAMP)
	$(BIN)/hyperrec status $(ARGS)

bench: $(STAMP)
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/preprocess.py
	$(BIN)/python bench/feature_store.py

# Re-resolve the lock after editing pyproject.toml dependencies. torch is resolved as the
# install step takes it (CPU build) and locked without its local label (+cpu), so that the
# same line matches the CPU wheel of any source.
LOCK_FILE ?= requirements.lock
lock:
	rm -rf /tmp/hyperrec-lock && $(PYTHON) -m venv /tmp/hyperrec-lock
	/tmp/hyperrec-lock/bin/pip install --quiet "pip==26.3"
	torch="$$(sed -nE 's/^[[:space:]]*"(torch==[^"]*)".*/\1/p' pyproject.toml)"; \
	  /tmp/hyperrec-lock/bin/pip install --quiet --no-deps --no-index "$$torch" 2>/dev/null \
	  || /tmp/hyperrec-lock/bin/pip install --quiet --no-deps --index-url $(TORCH_INDEX) "$$torch"
	/tmp/hyperrec-lock/bin/pip install --quiet ".[test]"
	/tmp/hyperrec-lock/bin/pip freeze --all --exclude hyperrec --exclude pip \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort > $(LOCK_FILE)

stack-up:
	docker compose -f docker/compose.yaml up -d --build

stack-down:
	docker compose -f docker/compose.yaml down

clean:
	rm -rf .hyperrec .pytest_cache
