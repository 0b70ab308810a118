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
GRPC_PORT ?= 50051
LOADTEST_USERS ?= 4
LOADTEST_TIME ?= 60s
LOADTEST_ARGS ?=

.PHONY: install install-test model up down status test bench bench-disagg clean \
	loadtest-fixed loadtest-random loadtest-chat loadtest-mooncake loadtest-ramp loadtest-step loadtest-grpc

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

# Headless Locust against a running `make up` (docs/loadtest.md): bounded in users and time,
# CSV and HTML report under loadtest/results/.
LOADTEST = @mkdir -p loadtest/results && $(PY) -m locust -f loadtest/locustfile.py --headless --only-summary \
	-H http://$(HOST):$(PORT) -u $(LOADTEST_USERS) -r $(LOADTEST_USERS) -t $(LOADTEST_TIME) --stop-timeout 60 \
	--csv loadtest/results/$(1) --html loadtest/results/$(1).html $(2) $(LOADTEST_ARGS)

loadtest-fixed: install-test
	$(call LOADTEST,fixed,--shape fixed)

loadtest-random: install-test
	$(call LOADTEST,random,--shape random)

loadtest-chat: install-test
	$(call LOADTEST,chat,--shape chat)

loadtest-mooncake: install-test
	$(call LOADTEST,mooncake,--shape mooncake)

loadtest-ramp: install-test
	$(call LOADTEST,ramp,--shape random --load-shape ramp)

loadtest-step: install-test
	$(call LOADTEST,step,--shape random --load-shape step)

loadtest-grpc: install-test
	$(call LOADTEST,grpc,--shape random --grpc-host $(HOST):$(GRPC_PORT))

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
