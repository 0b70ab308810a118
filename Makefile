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
# bench-vllm's model: vLLM's CPU attention rejects tiny-mixtral's head_dim of 16.
PEER_MODEL ?= tiny-mixtral-hd64
# Kubernetes in kind (docs/kubernetes.md): needs docker, kind and kubectl; helm comes from infra/scripts/helm.sh.
KIND_CLUSTER ?= cleave
KIND_IMAGE ?= cleave:dev
KIND_NAMESPACE ?= cleave
HELM := $(VENV)/bin/helm
GRPC_PORT ?= 50051
LOADTEST_USERS ?= 4
LOADTEST_TIME ?= 60s
LOADTEST_ARGS ?=

.PHONY: install install-test model up down status test bench bench-disagg bench-vllm rca-eval clean \
	kind-up kind-load kind-install kind-smoke kind-down \
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

# Cleave against vLLM's CPU build (docs/benchmarks.md); vLLM lives in its own .venv-vllm/.
bench-vllm: install-test
	@bash infra/scripts/vllm.sh install
	@$(CLEAVE) model build $(PEER_MODEL)
	@$(PY) bench/peer_vllm.py --model $(PEER_MODEL) $(BENCH_ARGS)

rca-eval: install
	@$(CLEAVE) rca-eval

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

kind-up:
	kind create cluster --name $(KIND_CLUSTER) --config infra/kind/cluster.yaml

kind-load:
	docker build -f infra/docker/Dockerfile -t $(KIND_IMAGE) .
	kind load docker-image $(KIND_IMAGE) --name $(KIND_CLUSTER)

kind-install:
	@bash infra/scripts/helm.sh install
	$(HELM) upgrade --install cleave charts/cleave --namespace $(KIND_NAMESPACE) --create-namespace \
	  --kube-context kind-$(KIND_CLUSTER) -f infra/kind/values.yaml --wait --timeout 10m
	kubectl --context kind-$(KIND_CLUSTER) -n $(KIND_NAMESPACE) wait llmdeployment/cleave \
	  --for=condition=Ready --timeout=10m

kind-smoke:
	@kubectl --context kind-$(KIND_CLUSTER) -n $(KIND_NAMESPACE) port-forward svc/cleave-router 18000:8000 >/dev/null & \
	  pf=$$!; trap 'kill $$pf' EXIT; \
	  for i in $$(seq 30); do curl -sf http://127.0.0.1:18000/health >/dev/null && break; sleep 1; done; \
	  curl -sf http://127.0.0.1:18000/v1/completions -H 'content-type: application/json' \
	    -d '{"model": "smollm2-135m-instruct", "prompt": "The capital of France is", "max_tokens": 16}'; echo

kind-down:
	kind delete cluster --name $(KIND_CLUSTER)
