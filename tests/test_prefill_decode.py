"""Prefill and decode workers as a router drives them: real gRPC on 127.0.0.1, two KV
stores with their index and registry in a real Redis, the hand-off of every request
through the store, and the invariants: exactness against transformers, prefix reuse,
seeded sampling, failover mid-stream, clear errors for bad input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from reference import assert_greedy_equal, load_hf, mixed_prompts

from cleave.common.stacks import format_stacks
from cleave.common.wire import collect_prefill, params_to_proto
from cleave.common.registry import Registry
from cleave.decode.config import DecodeConfig
from cleave.decode.service import DecodeServer
from cleave.engine.config import EngineConfig
from cleave.engine.llm_engine import LLMEngine
from cleave.engine.sampling_params import SamplingParams
from cleave.kvstore.config import KVStoreConfig
from cleave.kvstore.service import KVStoreServer
from cleave.prefill.config import PrefillConfig
from cleave.prefill.service import PrefillServer
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

ENGINE = dict(num_kv_blocks=256, max_model_len=512, num_threads=1, block_size=16)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Cluster:
    """Two stores, two prefill and three decode workers (the third is the one killed),
    served from an event loop on a thread of their own; tests talk to them with
    synchronous stubs, as a router in another process would."""

    model_dir: str
    redis_url: str
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    stores: list = field(default_factory=list)
    prefill: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    channels: list = field(default_factory=list)

    def call(self, coro, timeout: float = 120):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:  # say where it hangs: the loop's tasks and every thread
            print(f"cluster call timed out after {timeout} s:\n{format_stacks(self.loop)}", file=sys.stderr)
            raise

    def start(self) -> None:
        threading.Thread(target=self.loop.run_forever, name="cluster", daemon=True).start()
        tag = f"{os.getpid()}-{id(self)}"
        common = dict(port=0, metrics_port=0, redis_url=self.redis_url, drain_grace_seconds=1)
        for i in range(2):
            store = KVStoreServer(KVStoreConfig(instance_id=f"kvs{i}-{tag}", **common))
            self.stores.append(store)  # before start(): stop() drains what started halfway
            self.call(store.start())
        for cls, config_cls, role, count, pool in (
            (PrefillServer, PrefillConfig, "prefill", 2, self.prefill),
            (DecodeServer, DecodeConfig, "decode", 3, self.decode),
        ):
            for i in range(count):
                config = config_cls(model=self.model_dir, instance_id=f"{role}{i}-{tag}",
                                    load_report_seconds=0.1, **ENGINE, **common)
                server = self.call(_make(cls, config))
                pool.append(server)
                self.call(server.start())

    def prefill_stub(self, i: int) -> prefill_pb2_grpc.PrefillStub:
        channel = grpc.insecure_channel(self.prefill[i].address)
        self.channels.append(channel)
        return prefill_pb2_grpc.PrefillStub(channel)

    def decode_stub(self, i: int) -> decode_pb2_grpc.DecodeStub:
        channel = grpc.insecure_channel(self.decode[i].address)
        self.channels.append(channel)
        return decode_pb2_grpc.DecodeStub(channel)

    def stop(self) -> None:
        """Close and drain whatever started, in that order, even when one step fails."""
        with contextlib.ExitStack() as stack:  # callbacks run last-in first-out
            stack.callback(self.loop.call_soon_threadsafe, self.loop.stop)
            for server in reversed([*self.prefill, *self.decode, *self.stores]):
                if server.grpc is not None:
                    stack.callback(lambda server=server: self.call(server.drain(0)))
            for channel in self.channels:
                stack.callback(channel.close)


async def _make(cls, config):
    # Built on the cluster's loop: the engine thread hands outputs to the loop that asks.
    return cls(config)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def cluster(request, tiny_models, redis_databases):
    with redis_databases.lease() as redis_url:  # a database per model: none of the other's records
        cluster = Cluster(str(tiny_models[request.param]), redis_url)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def hf_model(cluster):
    return load_hf(cluster.model_dir)


@pytest.fixture(scope="module")
def vocab_size(cluster) -> int:
    with open(os.path.join(cluster.model_dir, "config.json")) as f:
        return json.load(f)["vocab_size"]


def greedy(max_tokens: int, **extra) -> common_pb2.SamplingParams:
    return params_to_proto(SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra))


def generate(prefill, decode, request_id: str, prompt: list[int], params) -> tuple[list[int], prefill_pb2.PrefillResponse]:
    """What a router does: prefill, then decode from the blocks prefill stored."""
    first = collect_prefill(prefill.Prefill(prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt, params=params), timeout=120))
    tokens = [first.first_token_id]
    if first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED:
        stream = decode.Decode(decode_pb2.DecodeRequest(
            request_id=request_id, token_ids=prompt + tokens, block_hashes=first.block_hashes, params=params,
            num_generated=1,
        ), timeout=120)
        for item in stream:
            tokens.extend(item.token_ids)
    return tokens, first


def metric(port: int, name: str, **labels: str) -> float:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- exactness -------------------------------------------------------------------------------


def test_split_greedy_equals_transformers(cluster, hf_model, vocab_size):
    prompts = mixed_prompts(vocab_size, 16, seed=11, min_len=3, max_len=70)
    max_tokens = 10
    prefill = [cluster.prefill_stub(i) for i in range(2)]
    decode = [cluster.decode_stub(i) for i in range(2)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(
            lambda i: generate(prefill[i % 2], decode[(i // 2) % 2], f"exact-{i}", prompts[i], greedy(max_tokens)),
            range(16),
        ))
    outputs = [tokens for tokens, _ in results]
    assert all(len(tokens) == max_tokens for tokens in outputs)
    assert_greedy_equal(hf_model, prompts, outputs, max_tokens)
    # Every full prompt block went to the store and was named to decode.
    for prompt, (_, first) in zip(prompts, results):
        assert len(first.block_hashes) == len(prompt) // ENGINE["block_size"]
    put = sum(metric(p.metrics_port, "cleave_prefill_kv_blocks_total", direction="put") for p in cluster.prefill)
    fetched = sum(metric(d.metrics_port, "cleave_decode_kv_blocks_total", direction="fetched") for d in cluster.decode)
    assert put > 0 and fetched > 0


def test_prefix_from_the_store_is_reused_exactly(cluster, hf_model, vocab_size):
    shared = mixed_prompts(vocab_size, 1, seed=21, min_len=40, max_len=40)[0]
    suffixes = mixed_prompts(vocab_size, 4, seed=22, min_len=2, max_len=9)
    prompts = [shared + s for s in suffixes]
    p0, p1 = cluster.prefill_stub(0), cluster.prefill_stub(1)
    d0 = cluster.decode_stub(0)
    def blocks(worker: int, direction: str) -> float:
        return metric(cluster.prefill[worker].metrics_port, "cleave_prefill_kv_blocks_total", direction=direction)

    size = ENGINE["block_size"]
    fetched_before, put_before = blocks(1, "fetched"), (blocks(0, "put"), blocks(1, "put"))
    first_round, _ = generate(p0, d0, "prefix-0", prompts[0], greedy(8))
    # A prompt with no cached prefix anywhere: every full block is put, without asking first.
    assert blocks(0, "put") - put_before[0] == len(prompts[0]) // size
    # The second round runs on the other prefill worker, whose own cache never saw the
    # prefix: its blocks can only come from the store.
    second = [generate(p1, d0, f"prefix-{i}", prompts[i], greedy(8)) for i in range(1, 4)]
    for _, first in second:
        assert first.num_cached_tokens >= 32
    fetched = blocks(1, "fetched")
    assert fetched - fetched_before >= 2
    # ... and it puts only the full blocks the store lacked: none of the shared prefix's.
    shared_blocks = len(shared) // size
    assert blocks(1, "put") - put_before[1] <= sum(len(p) // size - shared_blocks for p in prompts[1:4])
    assert_greedy_equal(hf_model, prompts, [first_round] + [tokens for tokens, _ in second], 8)


def test_seeded_sampling_equals_single_process(cluster, vocab_size):
    prompts = mixed_prompts(vocab_size, 3, seed=31, min_len=5, max_len=50)
    params = [SamplingParams(temperature=0.9, top_p=0.95, max_tokens=12, seed=100 + i, ignore_eos=True, logprobs=True)
              for i in range(3)]
    engine = LLMEngine(EngineConfig(model=cluster.model_dir, **ENGINE))
    expected = engine.generate(prompts, params)
    p, d = cluster.prefill_stub(1), cluster.decode_stub(1)
    for i, prompt in enumerate(prompts):
        tokens, first = generate(p, d, f"seeded-{i}", prompt, params_to_proto(params[i]))
        assert tokens == expected[i]
        assert first.logprob < 0


# -- failover ----------------------------------------------------------------------------


def test_decode_worker_killed_mid_stream_resumes_elsewhere(cluster, hf_model, vocab_size):
    prompt = mixed_prompts(vocab_size, 1, seed=41, min_len=37, max_len=37)[0]
    # Long enough that the worker is still generating when it is killed.
    max_tokens = 300
    sampled = SamplingParams(temperature=0.8, max_tokens=max_tokens, seed=7, ignore_eos=True)
    expected_sampled = LLMEngine(EngineConfig(model=cluster.model_dir, **ENGINE)).generate([prompt], sampled)[0]
    victim = cluster.decode_stub(2)
    survivor = cluster.decode_stub(1)
    prefill = cluster.prefill_stub(0)
    streams = {}
    for name, params in (("greedy", greedy(max_tokens)), ("sampled", params_to_proto(sampled))):
        first = collect_prefill(prefill.Prefill(prefill_pb2.PrefillRequest(request_id=f"failover-{name}", token_ids=prompt,
                                                           params=params), timeout=60))
        stream = victim.Decode(decode_pb2.DecodeRequest(
            request_id=f"failover-{name}", token_ids=prompt + [first.first_token_id],
            block_hashes=first.block_hashes, params=params, num_generated=1,
        ), timeout=60)
        streams[name] = (params, first, stream, [first.first_token_id])
    for name, (_, _, stream, tokens) in streams.items():
        for _ in range(4):
            tokens.extend(next(stream).token_ids)
    cluster.call(cluster.decode[2].drain(0))
    for name, (params, first, stream, tokens) in streams.items():
        with pytest.raises(grpc.RpcError):
            for item in stream:  # whatever was in flight when it died still counts as sent
                tokens.extend(item.token_ids)
        assert 5 <= len(tokens) < max_tokens
        resumed = survivor.Decode(decode_pb2.DecodeRequest(
            request_id=f"failover-{name}", token_ids=prompt + tokens, block_hashes=first.block_hashes,
            params=params, num_generated=len(tokens),
        ), timeout=60)
        items = list(resumed)
        tokens.extend(t for item in items for t in item.token_ids)
        assert items[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert_greedy_equal(hf_model, [prompt], [streams["greedy"][3]], max_tokens)
    assert streams["sampled"][3] == expected_sampled


# -- bad input -----------------------------------------------------------------------------


BAD_PREFILL = [
    (dict(request_id="", token_ids=[1, 2]), "request_id"),
    (dict(request_id="r", token_ids=[]), "token_ids is empty"),
    (dict(request_id="r", token_ids=[1, 10**9]), "prompt token ids"),
    (dict(request_id="r", token_ids=[1, 2], params=common_pb2.SamplingParams(top_p=0.0)), "top_p"),
    (dict(request_id="r", token_ids=[1, 2], params=common_pb2.SamplingParams(max_tokens=0)), "max_tokens"),
    (dict(request_id="r", token_ids=[1] * 600), "context"),
    (dict(request_id="r", token_ids=[1, 2],
          kvstore_targets=[common_pb2.InstanceInfo(role="kvstore", instance_id="x")]), "kvstore_targets"),
]


@pytest.mark.parametrize("fields, message", BAD_PREFILL)
def test_prefill_rejects_bad_input(cluster, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        collect_prefill(cluster.prefill_stub(0).Prefill(prefill_pb2.PrefillRequest(**fields), timeout=30))
    assert info.value.code() == INVALID, info.value.details()
    assert message in info.value.details()


BAD_DECODE = [
    (dict(request_id="r", token_ids=[], num_generated=1), "token_ids is empty"),
    (dict(request_id="r", token_ids=[1, 2, 3], num_generated=3), "num_output_tokens"),
    (dict(request_id="r", token_ids=[1, 2, 3], num_generated=2, params=common_pb2.SamplingParams(max_tokens=2)),
     "max_tokens"),
    (dict(request_id="r", token_ids=list(range(40)), num_generated=1, block_hashes=[12345]), "block_hashes"),
    (dict(request_id="r", token_ids=[1, 2, 3], num_generated=1, params=common_pb2.SamplingParams(temperature=-1)),
     "temperature"),
]


@pytest.mark.parametrize("fields, message", BAD_DECODE)
def test_decode_rejects_bad_input(cluster, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        list(cluster.decode_stub(0).Decode(decode_pb2.DecodeRequest(**fields), timeout=30))
    assert info.value.code() == INVALID, info.value.details()
    assert message in info.value.details()


def test_first_token_may_finish_the_request(cluster, vocab_size):
    prompt = mixed_prompts(vocab_size, 1, seed=51, min_len=20, max_len=20)[0]
    # One message: the blocks are put before it, as nothing will decode after it.
    (first,) = cluster.prefill_stub(0).Prefill(
        prefill_pb2.PrefillRequest(request_id="one", token_ids=prompt, params=greedy(1)), timeout=30)
    assert first.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert len(first.block_hashes) == len(prompt) // ENGINE["block_size"] > 0
    stop = collect_prefill(cluster.prefill_stub(0).Prefill(prefill_pb2.PrefillRequest(
        request_id="stop", token_ids=prompt, params=greedy(5, stop_token_ids=[first.first_token_id])), timeout=30))
    assert stop.first_token_id == first.first_token_id
    assert stop.finish_reason == common_pb2.FINISH_REASON_STOP


def test_first_token_is_sent_before_the_blocks_are_put(cluster, vocab_size):
    """The put is held until the first message has arrived: were the first token sent
    after the put, the first read would wait out its deadline."""
    prompt = mixed_prompts(vocab_size, 1, seed=52, min_len=40, max_len=40)[0]
    handoff = cluster.prefill[0].handoff
    put_missing = handoff.put_missing
    release = asyncio.Event()

    async def held(*args, **kwargs):
        await release.wait()
        return await put_missing(*args, **kwargs)

    handoff.put_missing = held
    port = cluster.prefill[0].metrics_port
    put_before = metric(port, "cleave_prefill_kv_blocks_total", direction="put")
    try:
        stream = cluster.prefill_stub(0).Prefill(prefill_pb2.PrefillRequest(
            request_id="first-before-put", token_ids=prompt, params=greedy(4)), timeout=30)
        first = next(stream)
        assert list(first.block_hashes) == [] and first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
        assert metric(port, "cleave_prefill_kv_blocks_total", direction="put") == put_before
        cluster.loop.call_soon_threadsafe(release.set)
        stored = next(stream)
        assert len(stored.block_hashes) == len(prompt) // ENGINE["block_size"]
        assert stored.first_token_id == 0 and stored.request_id == "first-before-put"
        assert next(stream, None) is None
        assert metric(port, "cleave_prefill_kv_blocks_total", direction="put") == put_before + len(stored.block_hashes)
    finally:
        del handoff.put_missing
        cluster.loop.call_soon_threadsafe(release.set)
    tokens, _ = generate(cluster.prefill_stub(1), cluster.decode_stub(0), "first-before-put-2", prompt, greedy(4))
    assert tokens[0] == first.first_token_id


def test_router_decodes_without_the_blocks_when_the_prefill_stream_breaks_after_the_first_token(
        cluster, hf_model, vocab_size):
    """Every prefill worker's put fails after the first token is out: the stream ends in
    an error, and the router's decode worker computes the prompt itself, exactly."""
    from redis import asyncio as aioredis

    from cleave.router.plugins import parse_pipeline
    from cleave.router.remote_engine import RemoteEngineClient
    from cleave.router.workers import WorkerPool

    prompt = mixed_prompts(vocab_size, 1, seed=53, min_len=40, max_len=40)[0]
    max_tokens = 6

    async def lost(*args, **kwargs):
        raise RuntimeError("the put was lost")

    async def route():
        client = aioredis.from_url(cluster.redis_url)
        engine = RemoteEngineClient(WorkerPool(client, cluster.model_dir), parse_pipeline("least-loaded"),
                                    parse_pipeline("least-loaded"))
        await engine.start()
        try:
            outputs = [out async for out in engine.generate(
                "broken-put", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))]
        finally:
            await engine.shutdown()
            await client.aclose()
        return outputs

    for server in cluster.prefill:
        server.handoff.put_missing = lost
    fetched_before = sum(metric(d.metrics_port, "cleave_decode_kv_blocks_total", direction="fetched")
                         for d in cluster.decode[:2])
    try:
        outputs = cluster.call(route())
    finally:
        for server in cluster.prefill:
            del server.handoff.put_missing
    tokens = [token for out in outputs for token in out.new_token_ids]
    assert len(tokens) == max_tokens and outputs[-1].finish_reason == "length"
    assert_greedy_equal(hf_model, [prompt], [tokens], max_tokens)
    fetched = sum(metric(d.metrics_port, "cleave_decode_kv_blocks_total", direction="fetched") for d in cluster.decode[:2])
    assert fetched == fetched_before  # nothing named, nothing stored: decode computed the prompt


# -- the service shell ------------------------------------------------------------------------


def test_workers_register_report_load_and_serve_health(cluster):
    registry = Registry.from_url(cluster.redis_url)
    roles = {r.instance_id: r for role in ("prefill", "decode") for r in registry.list_instances(role)}
    for server in [*cluster.prefill, *cluster.decode[:2]]:
        record = roles[server.config.instance_id]
        assert record.address == server.address
        assert "num_running" in record.load and "num_free_kv_blocks" in record.load
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=server.service_name), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "num_queued_prompt_tokens" in roles[cluster.prefill[0].config.instance_id].load
    assert metric(cluster.prefill[0].metrics_port, "cleave_prefill_requests_total", outcome="ok") > 0
    assert metric(cluster.prefill[0].metrics_port, "cleave_prefill_requests_total", outcome="invalid") > 0
    assert metric(cluster.decode[0].metrics_port, "cleave_decode_generated_tokens_total") > 0
    assert metric(cluster.decode[0].metrics_port, "cleave_decode_kv_blocks_total") >= 0


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_entry_point_help(role):
    out = subprocess.run([sys.executable, "-m", f"cleave.{role}", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    assert "--kv-pin-seconds" in out.stdout and "--block-size" in out.stdout


def test_client_cancel_aborts_the_engine_request(cluster, vocab_size):
    prompt = mixed_prompts(vocab_size, 1, seed=61, min_len=30, max_len=30)[0]
    first = collect_prefill(cluster.prefill_stub(0).Prefill(
        prefill_pb2.PrefillRequest(request_id="cancel", token_ids=prompt, params=greedy(400)), timeout=30))
    stream = cluster.decode_stub(0).Decode(decode_pb2.DecodeRequest(
        request_id="cancel", token_ids=prompt + [first.first_token_id], block_hashes=first.block_hashes,
        params=greedy(400), num_generated=1), timeout=60)
    next(stream)
    stream.cancel()
    engine = cluster.decode[0].engine
    deadline = time.monotonic() + 10
    while engine.stats()["num_requests"] or engine.stats()["num_running"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)
    assert metric(cluster.decode[0].metrics_port, "cleave_decode_requests_total", outcome="cancelled") >= 1


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_process_serves_then_drains_on_sigterm(role, tiny_models, redis_url):
    env = {**os.environ, "CLEAVE_MODEL": str(tiny_models["llama"]), "CLEAVE_REDIS_URL": redis_url,
           "CLEAVE_INSTANCE_ID": f"{role}-proc", "CLEAVE_PORT": "0", "CLEAVE_METRICS_PORT": "0",
           "CLEAVE_NUM_KV_BLOCKS": "64", "CLEAVE_MAX_MODEL_LEN": "256"}
    proc = subprocess.Popen([sys.executable, "-m", f"cleave.{role}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    registry = Registry.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        # The module's cluster registers in the same Redis: wait for this process's own record.
        while (record := registry.get(role, f"{role}-proc")) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "no record"
            time.sleep(0.05)
        with grpc.insecure_channel(record.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert registry.get(role, f"{role}-proc") is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unreachable_store_costs_reuse_not_the_request(cluster, vocab_size):
    prompt = mixed_prompts(vocab_size, 1, seed=71, min_len=40, max_len=40)[0]
    dead = common_pb2.InstanceInfo(role="kvstore", instance_id="gone", address="127.0.0.1:1")
    port = cluster.prefill[0].metrics_port
    errors_before = metric(port, "cleave_prefill_kv_errors_total")
    first = collect_prefill(cluster.prefill_stub(0).Prefill(prefill_pb2.PrefillRequest(
        request_id="dead-store", token_ids=prompt, params=greedy(4), kvstore_targets=[dead]), timeout=30))
    assert list(first.block_hashes) == []
    assert metric(port, "cleave_prefill_kv_errors_total") > errors_before
    tokens, _ = generate(cluster.prefill_stub(1), cluster.decode_stub(0), "live-store", prompt, greedy(4))
    assert tokens[0] == first.first_token_id


# -- sessions: many requests on one call ------------------------------------------------------


class SessionCall:
    """A ``Session`` call as a router holds it: starts and cancels go in as they come
    (the request stream stays open until :meth:`close`), batches come out."""

    def __init__(self, stub: decode_pb2_grpc.DecodeStub) -> None:
        self.outgoing: queue.Queue = queue.Queue()
        self.batches = stub.Session(iter(self.outgoing.get, None), timeout=120)

    def start(self, request: decode_pb2.DecodeRequest) -> None:
        self.outgoing.put(decode_pb2.SessionRequest(start=request))

    def cancel(self, request_id: str) -> None:
        self.outgoing.put(decode_pb2.SessionRequest(cancel=request_id))

    def close(self) -> None:
        self.outgoing.put(None)  # no more requests: the worker ends the call once these are done


def prefilled(cluster, request_id: str, prompt: list[int], params) -> decode_pb2.DecodeRequest:
    first = collect_prefill(cluster.prefill_stub(0).Prefill(
        prefill_pb2.PrefillRequest(request_id=request_id, token_ids=prompt, params=params), timeout=60))
    return decode_pb2.DecodeRequest(request_id=request_id, token_ids=prompt + [first.first_token_id],
                                    block_hashes=first.block_hashes, params=params, num_generated=1)


def test_session_serves_many_requests_exactly_in_shared_batches(cluster, hf_model, vocab_size):
    prompts = mixed_prompts(vocab_size, 4, seed=73, min_len=20, max_len=45)
    max_tokens = 12
    requests = [prefilled(cluster, f"session-{i}", prompt, greedy(max_tokens)) for i, prompt in enumerate(prompts)]
    tokens = {r.request_id: list(r.token_ids[-1:]) for r in requests}
    finish = {}
    session = SessionCall(cluster.decode_stub(0))
    for request in requests:
        session.start(request)
    # One bad request among them fails alone.
    session.start(decode_pb2.DecodeRequest(request_id="session-bad", token_ids=[1, 2], num_generated=2))
    session.close()
    batches = list(session.batches)  # ends, OK, once every request is done
    for batch in batches:
        for item in batch.items:
            tokens[item.request_id].extend(item.token_ids)
            if item.finish_reason:
                finish[item.request_id] = item.finish_reason
    errors = [error for batch in batches for error in batch.errors]
    assert [(e.request_id, e.code) for e in errors] == [("session-bad", grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    assert "num_output_tokens" in errors[0].message
    assert finish == {r.request_id: common_pb2.FINISH_REASON_LENGTH for r in requests}
    assert "session-bad" not in tokens
    assert_greedy_equal(hf_model, prompts, [tokens[r.request_id] for r in requests], max_tokens)
    # The point of a session: a step's tokens for several requests travel in one message.
    assert any(len({item.request_id for item in batch.items}) > 1 for batch in batches)


def test_session_cancel_aborts_one_request_and_keeps_the_others(cluster, vocab_size):
    prompts = mixed_prompts(vocab_size, 2, seed=79, min_len=30, max_len=30)
    long = prefilled(cluster, "session-long", prompts[0], greedy(400))
    short = prefilled(cluster, "session-short", prompts[1], greedy(40))
    cancelled_before = metric(cluster.decode[1].metrics_port, "cleave_decode_requests_total", outcome="cancelled")
    session = SessionCall(cluster.decode_stub(1))
    session.start(long)
    session.start(short)
    seen = {"session-long": 0, "session-short": 1}
    finish = {}
    cancelled = False
    received = []
    for batch in session.batches:
        received.append(str(batch))
        assert not batch.errors
        for item in batch.items:
            seen[item.request_id] += len(item.token_ids)
            if item.finish_reason:
                finish[item.request_id] = item.finish_reason
        if not cancelled and seen["session-long"]:
            session.cancel("session-long")
            session.close()
            cancelled = True
    assert finish == {"session-short": common_pb2.FINISH_REASON_LENGTH} and seen["session-short"] == 40, (seen, received)
    assert seen["session-long"] < 399
    engine = cluster.decode[1].engine
    deadline = time.monotonic() + 10
    while engine.stats()["num_requests"] or engine.stats()["num_running"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.02)
    assert metric(cluster.decode[1].metrics_port, "cleave_decode_requests_total",
                  outcome="cancelled") == cancelled_before + 1


def test_session_ends_when_its_worker_drains_once_its_requests_are_done(cluster, vocab_size):
    config = DecodeConfig(model=cluster.model_dir, instance_id=f"decode-drained-{os.getpid()}", port=0,
                          metrics_port=0, redis_url=cluster.redis_url, drain_grace_seconds=60, **ENGINE)
    server = cluster.call(_make(DecodeServer, config))
    cluster.call(server.start())
    prompts = mixed_prompts(vocab_size, 2, seed=83, min_len=30, max_len=30)
    running = prefilled(cluster, "drain-running", prompts[0], greedy(30))
    late = prefilled(cluster, "drain-late", prompts[1], greedy(30))
    with grpc.insecure_channel(server.address) as channel:
        session = SessionCall(decode_pb2_grpc.DecodeStub(channel))
        session.start(running)
        batches = iter(session.batches)
        first = next(batches)
        assert first.items[0].request_id == "drain-running"
        drained = asyncio.run_coroutine_threadsafe(server.drain(), cluster.loop)
        deadline = time.monotonic() + 10
        while not server.servicer.draining:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        session.start(late)  # the router has not heard yet: it is told to go elsewhere
        tokens, errors, finish = 1 + len(first.items[0].token_ids), [], None
        for batch in batches:  # the request still running finishes; then the call ends, OK
            errors.extend(batch.errors)
            for item in batch.items:
                tokens += len(item.token_ids)
                finish = item.finish_reason or finish
        assert finish == common_pb2.FINISH_REASON_LENGTH and tokens == 30
        assert [(e.request_id, e.code) for e in errors] == [("drain-late", grpc.StatusCode.UNAVAILABLE.value[0])]
        # Well within the 60 s grace: the session did not hold the drain open.
        drained.result(30)
        session.close()


def test_router_runs_concurrent_requests_on_sessions_and_aborts_one(cluster, hf_model, vocab_size):
    from redis import asyncio as aioredis

    from cleave.router.plugins import parse_pipeline
    from cleave.router.remote_engine import RemoteEngineClient
    from cleave.router.workers import WorkerPool

    prompts = mixed_prompts(vocab_size, 4, seed=89, min_len=20, max_len=50)
    max_tokens = 10

    async def route():
        client = aioredis.from_url(cluster.redis_url)
        engine = RemoteEngineClient(WorkerPool(client, cluster.model_dir), parse_pipeline("least-loaded"),
                                    parse_pipeline("least-loaded"))
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

        async def run(i: int, prompt: list[int]):
            return [out async for out in engine.generate(f"routed-{i}", prompt, params)]

        async def aborted():
            outputs = []
            async for out in engine.generate("routed-aborted", prompts[0],
                                             SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)):
                outputs.append(out)
                if len(outputs) == 3:
                    await engine.abort("routed-aborted")
            return outputs

        try:
            results = await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts)), aborted())
            sessions = engine.sessions.num_open
        finally:
            await engine.shutdown()
            await client.aclose()
        return results, sessions

    results, sessions = cluster.call(route())
    *routed, aborted = results
    assert sessions >= 1
    outputs = [[t for out in outs for t in out.new_token_ids] for outs in routed]
    assert all(outs[-1].finish_reason == "length" for outs in routed)
    assert_greedy_equal(hf_model, prompts, outputs, max_tokens)
    assert aborted[-1].finished and aborted[-1].finish_reason == "abort"
    assert sum(len(out.new_token_ids) for out in aborted) < 400
    for server in cluster.decode[:2]:
        deadline = time.monotonic() + 10
        while server.engine.stats()["num_requests"]:
            assert time.monotonic() < deadline, server.engine.stats()
            time.sleep(0.02)


def test_router_sends_short_prompts_straight_to_decode_which_prefills_them_exactly(cluster, hf_model, vocab_size):
    """Conditional disaggregation: with ``local_prefill_tokens`` 60 a 70-token prompt goes
    through a prefill worker (its blocks to the store) and prompts of at most 60 go
    straight to a decode worker, which prefills them itself: no prefill worker sees them,
    the router counts them, the outputs are exact, and a short prompt that shares the long
    one's first 48 tokens (three blocks) reuses them (from the store or the decode
    worker's cache) and says so."""
    from redis import asyncio as aioredis

    from cleave.router.metrics import RouterMetrics
    from cleave.router.plugins import parse_pipeline
    from cleave.router.remote_engine import RemoteEngineClient, RemoteEngineConfig
    from cleave.router.workers import WorkerPool

    long = mixed_prompts(vocab_size, 1, seed=97, min_len=70, max_len=70)[0]
    short = [long[:50], *mixed_prompts(vocab_size, 2, seed=98, min_len=20, max_len=60)]
    max_tokens = 8
    metrics = RouterMetrics()

    async def route():
        client = aioredis.from_url(cluster.redis_url)
        engine = RemoteEngineClient(WorkerPool(client, cluster.model_dir), parse_pipeline("least-loaded"),
                                    parse_pipeline("least-loaded"), RemoteEngineConfig(local_prefill_tokens=60),
                                    metrics)
        await engine.start()
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

        async def run(name: str, prompt: list[int]):
            return [out async for out in engine.generate(name, prompt, params)]

        try:
            first = await run("conditional-long", long)
            rest = await asyncio.gather(*(run(f"conditional-short-{i}", p) for i, p in enumerate(short)))
        finally:
            await engine.shutdown()
            await client.aclose()
        return [first, *rest]

    def prefilled() -> float:
        return sum(metric(p.metrics_port, "cleave_prefill_requests_total") for p in cluster.prefill)

    before = prefilled()
    results = cluster.call(route())
    assert prefilled() - before == 1
    assert metric_value(metrics.local_prefills) == 3
    prompts = [long, *short]
    outputs = [[t for out in outs for t in out.new_token_ids] for outs in results]
    assert all(outs[-1].finish_reason == "length" for outs in results)
    assert_greedy_equal(hf_model, prompts, outputs, max_tokens)
    assert set(results[0][0].served_by) == {"prefill", "decode"}
    assert all(set(outs[0].served_by) == {"decode"} for outs in results[1:])
    assert results[1][-1].num_cached_tokens == 48
    assert all(out.num_prompt_tokens == len(p) for outs, p in zip(results, prompts) for out in outs)


def metric_value(counter) -> float:
    return next(s.value for s in counter.collect()[0].samples if s.name.endswith("_total"))
