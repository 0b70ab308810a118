"""Prometheus and Alertmanager as `cleave up` runs them: the router's HTTP service
discovery document, the generated configs checked by promtool and amtool, and a real
Prometheus scraping a running platform whose counters answer PromQL with exactly the
requests sent."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cleave.common.registry import InstanceRecord
from cleave.launcher import StartupError
from cleave.observability.prometheus import prometheus_tiers, rule_files
from cleave.router.admin import add_prometheus_targets_route, prometheus_targets
from local_platform import Platform, free_port
from reference import mixed_prompts

INSTALL_HINT = "run `make install-test` (infra/scripts/prometheus.sh install) to install prometheus and alertmanager"
WORKER_FLAGS = ["--num-kv-blocks", "256", "--max-model-len", "512", "--block-size", "16"]
NUM_REQUESTS = 6
MAX_TOKENS = 5


def require(binary: str) -> str:
    found = shutil.which(binary)
    assert found, f"{binary} is not installed: {INSTALL_HINT}"
    return found


# -- the HTTP SD document ------------------------------------------------------------------


def records() -> list[InstanceRecord]:
    model = {"model": "/models/tiny-llama"}
    return [
        InstanceRecord("router", "router-0", "127.0.0.1:50051", {**model, "http": "0.0.0.0:8000"}),
        InstanceRecord("decode", "decode-1", "127.0.0.1:50081", {**model, "metrics_port": 9481}),
        InstanceRecord("decode", "decode-0", "127.0.0.1:50080", {**model, "metrics_port": 9480}),
        InstanceRecord("kvstore", "kvstore-0", "10.0.0.7:50060", {"metrics_port": 9460}),
        InstanceRecord("expert", "expert-0", "127.0.0.1:50090", {"model": "tiny-mixtral", "metrics_port": 0}),
    ]


def test_sd_document_has_one_group_per_instance_with_metrics():
    assert prometheus_targets(records()) == [
        {"targets": ["127.0.0.1:9480"], "labels": {"role": "decode", "instance_id": "decode-0", "model": "tiny-llama"}},
        {"targets": ["127.0.0.1:9481"], "labels": {"role": "decode", "instance_id": "decode-1", "model": "tiny-llama"}},
        {"targets": ["10.0.0.7:9460"], "labels": {"role": "kvstore", "instance_id": "kvstore-0"}},
        # A router bound to every interface is scraped at the host of its gRPC address.
        {"targets": ["127.0.0.1:8000"], "labels": {"role": "router", "instance_id": "router-0", "model": "tiny-llama"}},
    ]


def test_sd_route_serves_the_pool_records_as_json():
    app = FastAPI()
    pool = SimpleNamespace(records={"router": [], "decode": []})
    add_prometheus_targets_route(app, pool)
    client = TestClient(app)
    assert client.get("/admin/prometheus-targets").json() == []
    pool.records = {"decode": records()[1:3], "router": records()[:1]}
    response = client.get("/admin/prometheus-targets")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert [group["labels"]["instance_id"] for group in response.json()] == ["decode-0", "decode-1", "router-0"]


# -- the generated configs -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["disaggregated", "single"])
def test_generated_configs_pass_promtool_and_amtool(mode, tmp_path, monkeypatch):
    promtool, amtool = require("promtool"), require("amtool")
    require("prometheus")
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    args = argparse.Namespace(no_prometheus=False, prometheus_port=free_port(), alertmanager_port=free_port(),
                              host="0.0.0.0", port=8000, mode=mode)
    [[prometheus, alertmanager]] = prometheus_tiers(args)
    assert f"--web.listen-address=127.0.0.1:{args.prometheus_port}" in prometheus.argv
    assert "--web.enable-lifecycle" in prometheus.argv and "--cluster.listen-address=" in alertmanager.argv
    assert alertmanager.health_url == f"http://127.0.0.1:{args.alertmanager_port}/-/ready"
    config = tmp_path / "prometheus" / "prometheus.yml"
    text = config.read_text()
    assert ("http://127.0.0.1:8000/admin/prometheus-targets" in text) == (mode == "disaggregated")
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = subprocess.run([amtool, "check-config", str(tmp_path / "prometheus" / "alertmanager.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert prometheus_tiers(argparse.Namespace(no_prometheus=True)) == []


def test_a_busy_prometheus_port_stops_cleave_up_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAVE_HOME", str(tmp_path))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = argparse.Namespace(no_prometheus=False, prometheus_port=busy.getsockname()[1],
                                  alertmanager_port=free_port(), host="127.0.0.1", port=8000, mode="disaggregated")
        with pytest.raises(StartupError, match="already in use: --prometheus-port"):
            prometheus_tiers(args)


def test_rule_files_leave_promtool_tests_out(tmp_path):
    for name in ("slo.yml", "slo_test.yml", "notes.txt"):
        (tmp_path / name).write_text("groups: []\n")
    assert rule_files(tmp_path) == [str(tmp_path / "slo.yml")]


# -- a real Prometheus scraping the platform -----------------------------------------------


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def platform(request, tiny_models, tmp_path_factory):
    for binary in ("prometheus", "prometheus-alertmanager"):
        require(binary)
    p = Platform(tmp_path_factory.mktemp(f"platform-prometheus-{request.param}"), tiny_models[request.param],
                 *WORKER_FLAGS, prometheus=True)
    p.expected_up = EXPECTED_UP | (EXPERTS_UP if request.param == "mixtral" else set())
    try:
        p.up()
        yield p
    finally:
        p.down()


def query(platform: Platform, promql: str) -> list[dict]:
    response = httpx.get(f"http://127.0.0.1:{platform.prometheus_port}/api/v1/query", params={"query": promql},
                         timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def scalar(platform: Platform, promql: str) -> float | None:
    result = query(platform, promql)
    return float(result[0]["value"][1]) if result else None


def poll(fn, expected, timeout: float = 60.0):
    """``fn()`` once it equals ``expected``; fails with the last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (value := fn()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}, expected {expected!r}"
        time.sleep(0.5)
    return value


EXPECTED_UP = {
    ("cleave", "router", "router-0"), ("cleave", "prefill", "prefill-0"), ("cleave", "decode", "decode-0"),
    ("cleave", "decode", "decode-1"), ("cleave", "kvstore", "kvstore-0"),
    ("prometheus", None, None), ("alertmanager", None, None), ("agent", None, None),
}
EXPERTS_UP = {("cleave", "expert", "expert-0"), ("cleave", "expert", "expert-1")}


def test_every_service_is_an_up_target(platform):
    def up_targets():
        return {(r["metric"]["job"], r["metric"].get("role"), r["metric"].get("instance_id"))
                for r in query(platform, "up == 1")}

    poll(up_targets, platform.expected_up)
    models = {r["metric"].get("model") for r in query(platform, 'up{job="cleave",role!="kvstore"}')}
    assert models == {platform.model.name}
    # The SD document the router serves is what Prometheus discovered.
    targets = httpx.get(f"{platform.base_url}/admin/prometheus-targets").json()
    assert {g["labels"]["instance_id"] for g in targets} == {i for _, _, i in platform.expected_up if i}


def test_counters_answer_promql_with_the_requests_sent(platform):
    poll(lambda: len(query(platform, 'up{job="cleave"} == 1')), len(platform.expected_up) - 3)
    vocab_size = json.loads((platform.model / "config.json").read_text())["vocab_size"]
    prompts = mixed_prompts(vocab_size, NUM_REQUESTS, seed=11, min_len=40, max_len=60)
    for prompt in prompts:
        response = platform.complete(prompt, max_tokens=MAX_TOKENS)
        assert response.status_code == 200, response.text
    expected = {
        'sum(cleave_router_requests_total{endpoint="completions",outcome="success"})': NUM_REQUESTS,
        "sum(cleave_router_time_to_first_token_seconds_count)": NUM_REQUESTS,
        "sum(cleave_router_e2e_request_latency_seconds_count)": NUM_REQUESTS,
        "sum(cleave_router_generation_tokens_total)": NUM_REQUESTS * MAX_TOKENS,
        'sum(cleave_prefill_requests_total{outcome="ok"})': NUM_REQUESTS,
        "sum(cleave_prefill_generated_tokens_total)": NUM_REQUESTS,
        "sum(cleave_prefill_prompt_tokens_total)": sum(map(len, prompts)),
        'sum(cleave_decode_requests_total{outcome="ok"})': NUM_REQUESTS,
        "sum(cleave_decode_generated_tokens_total)": NUM_REQUESTS * (MAX_TOKENS - 1),
    }
    poll(lambda: {promql: scalar(platform, promql) for promql in expected}, expected)
    # Every prompt has at least two full 16-token blocks, put into the store by prefill.
    assert scalar(platform, 'sum(cleave_prefill_kv_blocks_total{direction="put"})') >= 2 * NUM_REQUESTS
    poll(lambda: (scalar(platform, "sum(cleave_kvstore_blocks_put_total)") or 0) > 0, True)
    poll(lambda: (scalar(platform, 'sum(cleave_kvstore_transfer_bytes_total{direction="in"})') or 0) > 0, True)
    # A histogram quantile over the scraped buckets is a real latency.
    if "expert" in {role for _, role, _ in platform.expected_up}:
        poll(lambda: (scalar(platform, "sum(cleave_expert_tokens_total)") or 0) > 0, True)
    ttft = scalar(platform, "histogram_quantile(0.5, sum by (le) (cleave_router_time_to_first_token_seconds_bucket))")
    assert ttft is not None and 0 < ttft < 120
