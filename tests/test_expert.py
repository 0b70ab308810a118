"""Expert replicas over real gRPC and their RunExperts stream on 127.0.0.1: remote experts
give the engine the same greedy tokens as local ones (and so as transformers) over either,
a failed replica's share moves to another holding the same experts, and bad calls get
INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cleave.common.registry import Registry
from cleave.engine import SamplingParams
from cleave.engine.config import EngineConfig
from cleave.engine.llm_engine import LLMEngine
from cleave.expert.client import ExpertUnavailableError, RemoteExpertBackend, Replica
from cleave.expert.config import ExpertConfig
from cleave.expert.service import ExpertServer, inline_max_tokens
from cleave.expert.spec import format_spec, parse_canonical, parse_spec
from cleave.expert.stream import CALL, ERROR, HEADER, StreamCallError, StreamClient, StreamServer, frame
from cleave.expert.weights import load_experts
from cleave.expert.wire import to_proto
from cleave.models.loader import load_model
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import expert_pb2 as pb
from cleave.protogen.cleave.v1 import expert_pb2_grpc as pb_grpc
from reference import assert_greedy_equal, load_hf, mixed_prompts

MOE_FAMILIES = ["mixtral", "qwen2_moe"]
MAX_NEW = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


class ThreadReplica:
    """An :class:`ExpertServer` on its own event loop in a thread of this process."""

    def __init__(self, model, experts: str, redis_url: str = "", instance_id: str = "", **config) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        config = ExpertConfig(model=str(model), experts=experts, port=0, metrics_port=0, redis_url=redis_url,
                              instance_id=instance_id or f"expert-test-{id(self)}", drain_grace_seconds=0, **config)
        self.server: ExpertServer | None = None
        try:
            self.server = ExpertServer(config)
            self._run(self.server.start())
        except BaseException:
            self.stop()
            raise
        self.address = self.server.address
        # As the registry describes it (the stream preferred), and as a caller that knows
        # only the gRPC address sees it.
        self.replica = Replica(self.address, self.server.experts.pairs, config.instance_id, self.server.stream_address)
        self.grpc_replica = Replica(self.address, self.server.experts.pairs, config.instance_id)

    def as_seen(self, transport: str) -> Replica:
        return self.replica if transport == "stream" else self.grpc_replica

    def _run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def kill(self) -> None:
        """Stop at once, cancelling calls in flight, as a crashed process would."""
        if self.server.stream is not None:
            self.loop.call_soon_threadsafe(self.server.stream.abort)
        self._run(self.server.grpc.server.stop(0))

    def stop(self) -> None:
        if self.loop.is_running():
            try:
                if self.server is not None and self.server.grpc is not None:
                    self._run(self.server.drain(0))
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self.thread.join(10)


@pytest.fixture
def replicas():
    with contextlib.ExitStack() as stack:  # every replica stops, even when another's stop fails

        def start(model, experts: str, **kwargs) -> ThreadReplica:
            replica = ThreadReplica(model, experts, **kwargs)
            stack.callback(replica.stop)
            return replica

        yield start


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def family(request, tiny_models):
    path = tiny_models[request.param]
    return request.param, path, load_hf(path)


def make_engine(path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), block_size=8, num_kv_blocks=512))


# -- specs and weights ------------------------------------------------------------------


@pytest.mark.parametrize("spec, pairs", [
    ("0-3", {(l, e) for l in (0, 1) for e in range(4)}),
    ("0,2", {(0, 0), (0, 2), (1, 0), (1, 2)}),
    ("1:4-7", {(1, e) for e in range(4, 8)}),
    ("0:1,1:2", {(0, 1), (1, 2)}),
    ("all", {(l, e) for l in (0, 1) for e in range(8)}),
])
def test_spec_round_trip(spec, pairs):
    parsed = parse_spec(spec, [0, 1], 8)
    assert parsed == pairs
    assert parse_canonical(format_spec(parsed)) == parsed


@pytest.mark.parametrize("spec, message", [
    ("", "empty"), ("8", "expert 8 >= num_experts 8"), ("2:0", "layer 2 is not an MoE layer"),
    ("a-b", "bad expert"), ("3-1", "bad expert range"),
])
def test_bad_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec, [0, 1], 8)


@pytest.mark.parametrize("port", [-2, 65536])
def test_stream_port_out_of_range_is_refused(port):
    with pytest.raises(ValueError, match=r"stream_port must be in \[-1, 65535\]"):
        ExpertConfig(model="m", stream_port=port)


def test_inline_max_tokens_below_minus_one_is_refused():
    with pytest.raises(ValueError, match="inline_max_tokens must be >= 0, or -1"):
        ExpertConfig(model="m", inline_max_tokens=-2)


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_loads_only_held_experts_equal_to_model(tiny_models, name):
    model = load_model(tiny_models[name])
    held = load_experts(tiny_models[name], frozenset({(1, 3), (0, 5)}))
    assert held.pairs == {(1, 3), (0, 5)}
    for layer, expert in held.pairs:
        weights = model.layers[layer].mlp.experts
        assert torch.equal(held.gate_up[layer, expert], weights.gate_up[expert])
        assert torch.equal(held.down[layer, expert], weights.down[expert])


# -- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stream", "grpc"])
def test_remote_experts_equal_local_and_transformers(family, replicas, transport):
    name, path, hf = family
    first, second = replicas(path, "0-3"), replicas(path, "4-7")
    local = make_engine(path)
    remote = make_engine(path)
    backend = RemoteExpertBackend([first.as_seen(transport), second.as_seen(transport)], timeout=30)
    remote.model.set_expert_backend(backend)
    prompts = mixed_prompts(hf.config.vocab_size, 16, seed=11)
    expected = local.generate(prompts, GREEDY)
    assert remote.generate(prompts, GREEDY) == expected
    assert_greedy_equal(hf, prompts, expected, MAX_NEW)
    # One call per replica per MoE layer forward, at most.
    assert backend.num_forwards > 0 and backend.num_calls <= 2 * backend.num_forwards
    assert backend.num_failovers == 0


# Interleaved experts (each layer's tokens split over both replicas, placed back slot by
# slot) and whole layers (one replica answers a layer: every slot, in order, in one call).
@pytest.mark.parametrize("split", [("0,2,4,6", "1,3,5,7"), ("0:0-7", "1:0-7")], ids=["experts", "layers"])
@pytest.mark.parametrize("top_k", [1, 2, 3, 8])
@pytest.mark.parametrize("transport", ["stream", "grpc"])
def test_slots_bit_identical_for_any_top_k(tiny_models, replicas, top_k, split, transport):
    path = tiny_models["mixtral"]
    model = load_model(path)
    first, second = (replicas(path, spec) for spec in split)
    backend = RemoteExpertBackend([first.as_seen(transport), second.as_seen(transport)], timeout=30)
    generator = torch.Generator().manual_seed(top_k)
    hidden = torch.randn(37, model.config.hidden_size, generator=generator)
    probs = torch.rand(37, 8, generator=generator).softmax(-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    for layer in (0, 1):
        local = model.local_expert_backend().forward(layer, hidden, ids, weights)
        assert torch.equal(backend.forward(layer, hidden, ids, weights), local)
    if split[0].startswith("0:"):
        assert backend.num_calls == backend.num_forwards == 2


# -- failover ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["stream", "grpc"])
def test_failover_to_a_replica_holding_the_same_experts(tiny_models, replicas, transport):
    path = tiny_models["mixtral"]
    doomed, backup, rest = replicas(path, "0-3"), replicas(path, "0-3"), replicas(path, "4-7")
    local = make_engine(path)
    prompts = mixed_prompts(512, 16, seed=12)
    expected = local.generate(prompts, GREEDY)
    remote = make_engine(path)
    # The doomed replica comes first, so the backend sends it experts 0-3 until it dies.
    backend = RemoteExpertBackend([r.as_seen(transport) for r in (doomed, backup, rest)], timeout=30)
    remote.model.set_expert_backend(backend)
    for index, prompt in enumerate(prompts):
        remote.add_request(str(index), prompt, GREEDY)
    outputs: dict[str, list[int]] = {}
    steps = 0
    while remote.has_unfinished():
        if steps == 3:
            doomed.kill()
        for out in remote.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
    assert backend.num_failovers >= 1
    assert [outputs[key] for key in sorted(outputs, key=int)] == expected


def test_no_replica_left_raises_quickly(tiny_models, replicas):
    path = tiny_models["mixtral"]
    first, second = replicas(path, "0-3"), replicas(path, "4-7")
    engine = make_engine(path)
    engine.model.set_expert_backend(RemoteExpertBackend([first.replica, second.replica], timeout=5))
    second.kill()
    started = time.monotonic()
    with pytest.raises(ExpertUnavailableError, match=r"no reachable expert replica holds .*:4-7|failed in this call"):
        engine.generate(mixed_prompts(512, 4, seed=13), GREEDY)
    assert time.monotonic() - started < 10


def test_uncovered_expert_raises_without_calling(tiny_models, replicas):
    path = tiny_models["mixtral"]
    only = replicas(path, "0-3")
    backend = RemoteExpertBackend([only.replica], timeout=5)
    hidden = torch.randn(2, 64)
    with pytest.raises(ExpertUnavailableError, match="0:5"):
        backend.forward(0, hidden, torch.tensor([[0, 5], [1, 2]]), torch.full((2, 2), 0.5))
    assert backend.num_calls == 0


EVERY_PAIR = frozenset((layer, e) for layer in (0, 1) for e in range(8))


def _check_one_deadline(model, hung: Replica, healthy: Replica) -> None:
    """``hung`` takes calls and never answers: its share moves on to ``healthy`` after one
    deadline, and with nowhere to move it the error comes after the deadline, not never."""
    hidden = torch.randn(5, 64)
    weights, ids = torch.topk(torch.rand(5, 8).softmax(-1), 2, dim=-1)
    backend = RemoteExpertBackend([hung, healthy], timeout=1)
    alone = RemoteExpertBackend([hung], timeout=1)
    try:
        started = time.monotonic()
        for layer in (0, 1):
            expected = model.local_expert_backend().forward(layer, hidden, ids, weights)
            assert torch.equal(backend.forward(layer, hidden, ids, weights), expected)
        assert backend.num_failovers == 1  # set aside after its first deadline
        assert time.monotonic() - started < 4

        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError, match="DEADLINE_EXCEEDED"):
            alone.forward(0, hidden, ids, weights)
        assert time.monotonic() - started < 4
    finally:
        backend.close()
        alone.close()


class _Hung(pb_grpc.ExpertServicer):
    async def RunExperts(self, request, context):
        await asyncio.Event().wait()


def test_hung_replica_costs_one_deadline(tiny_models, replicas):
    """A replica that accepts calls and never answers: its share moves on after the
    deadline, and with nowhere to move it the error comes after the deadline, not never."""
    path = tiny_models["mixtral"]
    model = load_model(path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve():
        server = grpc.aio.server()
        pb_grpc.add_ExpertServicer_to_server(_Hung(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        hung = Replica(f"127.0.0.1:{port}", EVERY_PAIR)
        _check_one_deadline(model, hung, replicas(path, "all").grpc_replica)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_hung_stream_costs_one_deadline(tiny_models, replicas):
    """The same over the stream: a listener that takes connections and never answers."""
    path = tiny_models["mixtral"]
    model = load_model(path)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads
        hung = Replica("127.0.0.1:1", EVERY_PAIR, "", f"127.0.0.1:{silent.getsockname()[1]}")
        _check_one_deadline(model, hung, replicas(path, "all").replica)


# -- the service -------------------------------------------------------------------------


def _request(layer=0, hidden=None, ids=None, weights=None, experts=()):
    hidden = torch.randn(3, 64) if hidden is None else hidden
    ids = torch.tensor([[0, 1], [2, 3], [1, 0]]) if ids is None else ids
    weights = torch.full(tuple(ids.shape), 0.5) if weights is None else weights
    return pb.RunExpertsRequest(layer=layer, hidden_states=to_proto(hidden), topk_ids=to_proto(ids),
                                topk_weights=to_proto(weights), expert_ids=list(experts))


@pytest.mark.parametrize("request_, message", [
    (_request(layer=5), "layer 5 is not an MoE layer"),
    (_request(hidden=torch.randn(3, 63)), r"hidden_states must be \[num_tokens, 64\]"),
    (_request(hidden=torch.randn(3, 64, dtype=torch.float64).half()), "hidden_states must be torch.float32"),
    (_request(ids=torch.tensor([[0, 9], [1, 2], [0, 1]])), r"topk_ids must be in \[0, 8\)"),
    (_request(ids=torch.tensor([[0, 1], [1, 2]])), r"topk_ids must be \[3, top_k\]"),
    (_request(ids=torch.tensor([[0, 1], [2, 3], [1, 0]], dtype=torch.int32)), "topk_ids must be int64"),
    (_request(weights=torch.ones(3, 3)), "topk_weights must have topk_ids' shape"),
    (_request(experts=[5]), r"experts \[5\] of layer 0 are not held here"),
    (pb.RunExpertsRequest(layer=0, hidden_states=common_pb2.Tensor(data=b"xx", shape=[3, 64], dtype="float32")),
     "hidden_states: 2 bytes for shape"),
    (pb.RunExpertsRequest(layer=0, hidden_states=common_pb2.Tensor(dtype="complex64")), "unknown dtype"),
])
@pytest.mark.parametrize("transport", ["stream", "grpc"])
def test_bad_input_is_invalid_argument(tiny_models, replicas, request_, message, transport):
    replica = replicas(tiny_models["mixtral"], "0-3")
    if transport == "stream":
        stream = StreamClient(replica.server.stream_address)
        with pytest.raises(StreamCallError) as caught:
            stream.call(request_, timeout=10)
        # The connection is dropped after an error; the next call dials again and succeeds.
        assert list(stream.call(_request(), timeout=10).expert_ids) == [0, 1, 2, 3]
        stream.close()
    else:
        with grpc.insecure_channel(replica.address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.ExpertStub(channel).RunExperts(request_, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, caught.value.details())
    body = httpx.get(f"http://127.0.0.1:{replica.server.metrics_port}/metrics", timeout=10).text
    assert 'cleave_expert_rejected_requests_total{code="INVALID_ARGUMENT"} 1.0' in body


def _exchange(address: str, data: bytes) -> tuple[int, bytes, bytes]:
    """Send raw bytes down a new connection: the reply's kind, payload, and what follows
    (empty once the replica hangs up)."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if len(received) >= HEADER.size and len(received) >= HEADER.size + HEADER.unpack(received[:HEADER.size])[0]:
                break
        length, kind = HEADER.unpack(received[:HEADER.size])
        payload = received[HEADER.size:HEADER.size + length]
        rest = received[HEADER.size + length:]
        if not rest:
            sock.settimeout(5)
            rest = sock.recv(65536)
    return kind, payload, rest


@pytest.mark.parametrize("data, code, message, hangs_up", [
    (frame(CALL, b"\xff\xff\xff"), "INVALID_ARGUMENT", "not a RunExpertsRequest", False),
    (HEADER.pack(3, 7) + b"abc", "INVALID_ARGUMENT", "unknown frame kind 7", True),
    (HEADER.pack(2**31, CALL), "RESOURCE_EXHAUSTED", "over the limit", True),
], ids=["garbage", "kind", "too-long"])
def test_bad_frames_get_an_error_and_a_bad_header_a_hang_up(tiny_models, replicas, data, code, message, hangs_up):
    replica = replicas(tiny_models["mixtral"], "0-3")
    address = replica.server.stream_address
    kind, payload, rest = _exchange(address, data) if hangs_up else _exchange(address, data + frame(CALL, b""))
    assert kind == ERROR
    name, _, text = payload.decode().partition("\n")
    assert name == code and message in text, payload
    if hangs_up:
        assert rest == b""
    else:  # the connection goes on: the empty call that followed was answered (INVALID_ARGUMENT: layer 0 of nothing)
        assert HEADER.unpack(rest[:HEADER.size])[1] == ERROR


def test_a_kept_connection_closed_while_idle_is_dialled_again(tiny_models):
    """A replica that drained and came back on the same port: the caller's kept
    connection is dead, and the next call goes through on a new one, not UNAVAILABLE."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    calls = []

    async def run(request):
        calls.append(request.layer)
        return pb.RunExpertsResponse(expert_ids=[request.layer])

    def on_loop(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    async def start(port):
        server = StreamServer(run, "127.0.0.1", port)
        await server.start()
        return server

    try:
        first = on_loop(start(0))
        stream = StreamClient(f"127.0.0.1:{first.port}")
        assert list(stream.call(pb.RunExpertsRequest(layer=1), timeout=10).expert_ids) == [1]
        on_loop(first.close())
        second = on_loop(start(first.port))
        assert list(stream.call(pb.RunExpertsRequest(layer=2), timeout=10).expert_ids) == [2]
        assert calls == [1, 2]
        on_loop(second.close())
        with pytest.raises(StreamCallError) as caught:  # nobody listening: UNAVAILABLE, at once
            stream.call(pb.RunExpertsRequest(layer=3), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stream.close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_stream_drain_finishes_the_call_in_flight_then_refuses(tiny_models, replicas):
    replica = replicas(tiny_models["mixtral"], "all", inline_max_tokens=64)
    stream = StreamClient(replica.server.stream_address)
    hidden = torch.randn(600, 64)  # over inline_max_tokens: runs on a thread while the drain starts
    ids = torch.randint(0, 8, (600, 2))
    big = _request(hidden=hidden, ids=ids, weights=torch.full((600, 2), 0.5))
    assert len(stream.call(big, timeout=10).slot_indices) == 1200
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(stream.call, big, 30)
        deadline = time.monotonic() + 10
        while not any(replica.server.stream._connections.values()):
            assert time.monotonic() < deadline, "the call never reached the replica"
            time.sleep(0.001)
        replica.stop()
        assert len(in_flight.result(30).slot_indices) == 1200
    with pytest.raises(StreamCallError) as caught:
        stream.call(_request(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    stream.close()




def test_calls_on_the_loop_and_on_a_worker_thread_answer_alike(tiny_models, replicas):
    on_thread = replicas(tiny_models["mixtral"], "all", inline_max_tokens=0)
    on_loop = replicas(tiny_models["mixtral"], "all", inline_max_tokens=10**6)
    request = _request(hidden=torch.randn(200, 64), ids=torch.randint(0, 8, (200, 2)),
                       weights=torch.full((200, 2), 0.5))
    answers = []
    for replica in (on_thread, on_loop):
        stream = StreamClient(replica.server.stream_address)
        answers.append(stream.call(request, timeout=10))
        stream.close()
    assert answers[0] == answers[1] and len(answers[0].slot_indices) == 400


@pytest.mark.parametrize("configured, num_threads, expected", [(-1, 1, 256), (-1, 2, 64), (-1, 8, 64), (0, 1, 0),
                                                               (300, 4, 300)])
def test_inline_max_tokens_defaults_by_torch_threads(configured, num_threads, expected):
    assert inline_max_tokens(configured, num_threads) == expected


def test_unheld_slots_are_not_returned(tiny_models, replicas):
    replica = replicas(tiny_models["mixtral"], "0-3")
    with grpc.insecure_channel(replica.address) as channel:
        response = pb_grpc.ExpertStub(channel).RunExperts(
            _request(ids=torch.tensor([[0, 5], [6, 7], [4, 2]])), timeout=10
        )
    assert list(response.slot_indices) == [0, 5]
    assert list(response.expert_ids) == [0, 2]
    assert list(response.slot_outputs.shape) == [2, 64]


def test_health_registry_and_metrics(tiny_models, replicas, redis_url):
    replica = replicas(tiny_models["mixtral"], "1:4-7", redis_url=redis_url, instance_id="expert-a")
    with grpc.insecure_channel(replica.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cleave.v1.Expert"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    registry = Registry.from_url(redis_url)
    record = registry.get("expert", "expert-a")
    assert record is not None and record.address == replica.address
    assert record.capabilities["experts"] == "1:4-7"
    assert record.capabilities["stream_address"] == replica.server.stream_address != ""
    assert parse_canonical(record.capabilities["experts"]) == {(1, e) for e in range(4, 8)}

    backend = RemoteExpertBackend(registry=Registry.from_url(redis_url), timeout=10)
    assert backend.replicas == [replica.replica]
    ids = torch.tensor([[4, 5], [5, 6]])
    backend.forward(1, torch.randn(2, 64), ids, torch.full((2, 2), 0.5))
    body = httpx.get(f"http://127.0.0.1:{replica.server.metrics_port}/metrics", timeout=10).text
    assert 'cleave_expert_tokens_total{expert="5",layer="1"} 2.0' in body
    assert "cleave_expert_request_seconds_count 1.0" in body

    replica.stop()  # a drain deregisters at once
    assert registry.get("expert", "expert-a") is None
    backend.close()


def test_process_serves_registers_and_fails_over(tiny_models, redis_url):
    """``python -m cleave.expert`` as real processes; SIGKILL one, the backend moves on."""
    path = tiny_models["qwen2_moe"]
    env = {**os.environ, "CLEAVE_REDIS_URL": redis_url, "CLEAVE_METRICS_PORT": "0"}
    # proc-1 turns its stream off: its callers use gRPC.
    procs = [
        subprocess.Popen([sys.executable, "-m", "cleave.expert", "--model", str(path), "--experts", "all",
                          "--port", "0", "--instance-id", f"proc-{i}", "--num-threads", "1", "--stream-port", port],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for i, port in enumerate(["0", "-1"])
    ]
    try:
        registry = Registry.from_url(redis_url)
        deadline = time.monotonic() + 60
        while len(registry.list_instances("expert")) < 2:
            assert all(p.poll() is None for p in procs), procs[0].stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "replicas did not register"
            time.sleep(0.05)
        backend = RemoteExpertBackend(registry=registry, timeout=10)
        streams = {r.instance_id: r.stream_address for r in backend.replicas}
        assert re.fullmatch(r"127\.0\.0\.1:\d+", streams["proc-0"]) and streams["proc-1"] == "", streams
        engine = make_engine(path)
        engine.model.set_expert_backend(backend)
        prompts = mixed_prompts(512, 4, seed=14)
        expected = make_engine(path).generate(prompts, GREEDY)
        assert engine.generate(prompts, GREEDY) == expected
        first = backend.replicas[0].instance_id
        procs[int(first.split("-")[1])].kill()
        assert engine.generate(prompts, GREEDY) == expected
        assert backend.num_failovers >= 1
        survivor = procs[1 - int(first.split("-")[1])]
        survivor.terminate()  # SIGTERM drains and deregisters
        assert survivor.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
