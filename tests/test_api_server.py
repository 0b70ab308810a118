"""Models, health, metrics and headers; a client that hangs up frees its engine request."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

PROMPT = "Serving many users at once means"


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def test_models_lists_the_served_model(openai_client, api_server):
    models = openai_client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    card = models[0].model_dump()
    assert card["object"] == "model"
    assert card["root"] == api_server.model_path
    assert card["max_model_len"] == 1024
    assert openai_client.models.retrieve("tiny-llama").id == "tiny-llama"


def test_health_and_instance_header(api_server):
    response = httpx.get(f"{api_server.root_url}/health", timeout=10)
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    for path in ("/health", "/metrics", "/v1/models", "/v1/nothing-here"):
        assert httpx.get(f"{api_server.root_url}{path}", timeout=10).headers["x-cleave-instance"] == "test-instance"


def test_tokens_that_arrive_together_still_count_one_interval_each():
    # A reader that lags gets the tokens it missed merged into one output, the first
    # included; the inter-token histogram must still count generated tokens minus one.
    from cleave.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    tracker = metrics.track()
    tracker.on_tokens(3)
    tracker.on_tokens(0)
    tracker.on_tokens(2)
    tracker.on_finish("length")

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert sample("cleave_router_time_to_first_token_seconds_count") == 1
    assert sample("cleave_router_inter_token_latency_seconds_count") == 4
    # The two that came with the first token reached the client with it: no gap.
    assert sample("cleave_router_inter_token_latency_seconds_bucket", le="0.001") >= 2
    assert sample("cleave_router_generation_tokens_total") == 5


def test_generation_feeds_the_metrics(openai_client, api_server):
    def snapshot():
        return {
            "ok": api_server.metric("cleave_router_requests_total", endpoint="chat_completions", outcome="success"),
            "prompt": api_server.metric("cleave_router_prompt_tokens_total"),
            "generated": api_server.metric("cleave_router_generation_tokens_total"),
            "ttft": api_server.metric("cleave_router_time_to_first_token_seconds_count"),
            "itl": api_server.metric("cleave_router_inter_token_latency_seconds_count"),
            "e2e": api_server.metric("cleave_router_e2e_request_latency_seconds_count"),
            "length": api_server.metric("cleave_router_request_finish_total", finish_reason="length"),
        }

    before = snapshot()
    response = openai_client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = snapshot()
    assert after["ok"] == before["ok"] + 1
    assert after["prompt"] == before["prompt"] + response.usage.prompt_tokens
    assert after["generated"] == before["generated"] + 5
    assert after["ttft"] == before["ttft"] + 1
    assert after["itl"] == before["itl"] + 4
    assert after["e2e"] == before["e2e"] + 1
    assert after["length"] == before["length"] + 1
    assert api_server.metric("cleave_router_requests_running") == 0


def test_metrics_names_are_prefixed_and_labels_bounded(api_server):
    body = httpx.get(f"{api_server.root_url}/metrics", timeout=10).text
    router_lines = [line for line in body.splitlines() if line.startswith("cleave_router_")]
    assert router_lines
    endpoints = {line.split('endpoint="')[1].split('"')[0] for line in router_lines if 'endpoint="' in line}
    assert endpoints <= {"completions", "chat_completions", "models", "health", "metrics", "grpc_generate", "other"}


def open_raw_request(root_url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket, so the test decides when the connection drops."""
    url = urlsplit(root_url)
    payload = json.dumps(body).encode()
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_disconnect_aborts_the_engine_request(api_server, wait_engine_idle, stream):
    endpoint = "completions"
    generated_before = api_server.metric("cleave_router_generation_tokens_total")
    cancelled_before = api_server.metric("cleave_router_requests_total", endpoint=endpoint, outcome="cancelled")
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": stream}
    sock = open_raw_request(api_server.root_url, "/v1/completions", body)
    try:
        if stream:
            received = b""
            while received.count(b"data: ") < 3:
                chunk = sock.recv(4096)
                assert chunk, "the server closed the stream early"
                received += chunk
            assert b" 200 " in received.split(b"\r\n", 1)[0]
        else:
            wait_for(lambda: api_server.metric("cleave_router_requests_running") == 1, what="the request to run")
    finally:
        sock.close()
    wait_for(
        lambda: api_server.metric("cleave_router_requests_total", endpoint=endpoint, outcome="cancelled")
        == cancelled_before + 1,
        what="the request to be counted as cancelled",
    )
    assert api_server.metric("cleave_router_requests_running") == 0
    stats = wait_engine_idle(api_server.engine)
    assert stats["num_used_kv_blocks"] == 0
    generated = api_server.metric("cleave_router_generation_tokens_total") - generated_before
    assert 0 < generated < 1000
