# The two commands a new user needs: `make up` and `make test`.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
CLEAVE := $(VENV)/bin/cleave
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-moe
UP_ARGS ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install install-test model up down status test bench bench-disagg clean

install:
	@bash infra/scripts/install.sh

install-test:
	@bash infra/scripts/install.sh --test

model: install
	@$(CLEAVE) model build $(MODEL)

up: install
	@$(CLEAVE) up --model $(MODEL) --host $(HOST) --port $(PORT) $(UP_ARGS)

down:
	@if [ -x $(CLEAVE) ]; then $(CLEAVE) down; else echo "cleave is not installed; nothing to stop"; fi

status: install
	@$(CLEAVE) status

test: install-test
	@$(PY) -m pytest $(PYTEST_ARGS)

bench: install-test
	@$(PY) bench/engine_throughput.py

bench-disagg: install-test
	@$(PY) bench/disagg.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
