"""The KV store as its users see it: real engine KV blocks over real gRPC on 127.0.0.1,
the index and registry in a real Redis, /metrics over HTTP, and the process itself
draining on SIGTERM. The memory tier's policy is checked directly, with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cleave.common import grpc_server
from cleave.common.registry import InstanceRecord, Registry
from cleave.kvstore.backend import StoredBlock, StoreFullError
from cleave.kvstore.client import KVStoreClient, KVStorePool, choose_store, group_by_store
from cleave.kvstore.config import KVStoreConfig
from cleave.kvstore.index import index_key, store_blocks_key
from cleave.kvstore.memory import MemoryBackend
from cleave.kvstore.service import SERVICE_NAME, KVStoreServer
from cleave.protogen.cleave.v1 import kvstore_pb2 as pb
from cleave.protogen.cleave.v1 import kvstore_pb2_grpc as pb_grpc

_ids = itertools.count()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def running_store(redis_url: str = "", backend=None, **overrides):
    """A store on a free port of 127.0.0.1, drained on exit."""
    overrides.setdefault("instance_id", f"kvs-{os.getpid()}-{next(_ids)}")
    config = KVStoreConfig(port=0, metrics_port=0, redis_url=redis_url, drain_grace_seconds=1, **overrides)
    server = KVStoreServer(config, backend)
    try:
        await server.start()
        yield server
    finally:
        if server.grpc is not None:  # made first in start(): drain what started, even halfway
            await server.drain(0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def metric(port: int, name: str, **labels: str) -> float:
    body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


# -- real KV blocks from the engine -------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_models):
    from cleave.engine.config import EngineConfig
    from cleave.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(tiny_models["llama"]), num_kv_blocks=64, max_model_len=512))


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return [(7 * i + 3) % 200 + 5 for i in range(4 * 16 + 5)]  # four full blocks and a tail


@pytest.fixture(scope="module")
def kv_blocks(engine, prompt):
    """The prompt's full blocks as the engine exports them: (hash, bytes, KVBlock)."""
    from cleave.engine.sampling_params import SamplingParams

    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=1))
    blocks = engine.export_blocks(engine.block_hashes(prompt))
    assert len(blocks) == 4
    return [(b.block_hash, b.to_bytes(), b) for b in blocks]


@pytest.mark.parametrize("put_chunk, get_chunk", [(1000, 777), (8192, 1 << 20), (1 << 20, 64)])
def test_engine_blocks_round_trip_byte_exact_across_chunk_boundaries(kv_blocks, put_chunk, get_chunk):
    import torch

    from cleave.engine.kv_transfer import KVBlock

    async def scenario():
        async with running_store(chunk_bytes=get_chunk) as store:
            async with KVStoreClient(store.address, chunk_bytes=put_chunk) as client:
                put = await client.put_blocks(
                    [(h, data) for h, data, _ in kv_blocks], token_ids={h: b.token_ids for h, _, b in kv_blocks}
                )
                assert put.stored_hashes == [h for h, _, _ in kv_blocks]
                assert put.num_bytes == sum(len(data) for _, data, _ in kv_blocks)
                return await client.get_stored_blocks([h for h, _, _ in kv_blocks])

    got = run(scenario())
    assert len(kv_blocks[0][1]) % 1000 and len(kv_blocks[0][1]) > 8192  # chunks really straddle
    for block_hash, data, block in kv_blocks:
        assert got[block_hash].data == data
        assert got[block_hash].token_ids == block.token_ids
        decoded = KVBlock.from_bytes(got[block_hash].data)
        assert decoded.block_hash == block_hash and torch.equal(decoded.data, block.data)


def test_small_blocks_travel_packed_several_to_a_message_both_ways(kv_blocks):
    """A stream message costs more than a block of tens of kilobytes, so both sides pack
    chunks up to chunk_bytes a message once the other side is known to read them; a
    block larger than that still spans messages."""
    hashes = [h for h, _, _ in kv_blocks]
    block_bytes = max(len(data) for _, data, _ in kv_blocks)  # headers differ by a few bytes
    big = (999, b"B" * (3 * block_bytes + 5))  # straddles messages of two blocks' size
    blocks = [(h, data) for h, data, _ in kv_blocks] + [big]

    async def scenario():
        async with running_store(chunk_bytes=2 * block_bytes) as store:
            async with KVStoreClient(store.address, chunk_bytes=2 * block_bytes) as client:
                sent: list[list[pb.PutBlocksRequest]] = []
                put_blocks = client.stub.PutBlocks

                def counting(requests, **kwargs):
                    sent.append(list(requests))
                    return put_blocks(iter(sent[-1]), **kwargs)

                client.stub.PutBlocks = counting
                # The first put goes a chunk a message: the store may predate packing.
                assert not client.packs_puts
                await client.put_blocks(blocks[:2])
                assert client.packs_puts  # its reply said it reads packed puts
                put = await client.put_blocks(blocks, token_ids={h: b.token_ids for h, _, b in kv_blocks},
                                              pin_ttl_seconds=30)
                request = pb.GetBlocksRequest(block_hashes=[*hashes, 5, 999])
                packed_request = pb.GetBlocksRequest(block_hashes=request.block_hashes, packed=True)
                packed = [r async for r in client.stub.GetBlocks(packed_request)]
                unpacked = [r async for r in client.stub.GetBlocks(request)]  # a reader that predates packing
                got = await client.get_stored_blocks([*hashes, 999])
                return sent, put, packed, unpacked, got, await client.stats()

    sent, put, packed, unpacked, got, stats = run(scenario())
    assert put.stored_hashes == [*hashes, 999] and stats.num_pinned == 5
    assert [1 + len(r.more_chunks) for r in sent[0]] == [1, 1]
    # Four blocks two to a message, then the big one in pieces of two blocks' size.
    assert [1 + len(r.more_chunks) for r in sent[1]] == [2, 2, 1, 1]
    assert [1 + len(r.more_chunks) for r in packed] == [2, 2, 1, 1]
    assert [1 + len(r.more_chunks) for r in unpacked] == [1] * 6
    chunks = [c for r in packed for c in (r.chunk, *r.more_chunks)]
    assert chunks == [r.chunk for r in unpacked]  # the same chunks either way
    assert [c.block_hash for c in chunks] == [*hashes, 999, 999]  # 5 is absent: skipped
    assert [bool(c.token_ids) for c in chunks] == [True] * 4 + [False] * 2
    assert [c.last for c in chunks] == [True] * 4 + [False, True]
    assert all(len(r.chunk.data) + sum(len(c.data) for c in r.more_chunks) <= 2 * block_bytes for r in packed)
    for block_hash, data, block in kv_blocks:
        assert got[block_hash] == StoredBlock(data, block.token_ids)
    assert got[999].data == big[1]


PAGE_FAULTS_PER_CALL = """
import os, resource, sys
from cleave.common.startup import prepare_to_serve
from cleave.protogen.cleave.v1 import kvstore_pb2 as pb
if sys.argv[1] == "serving":
    assert prepare_to_serve()
data = [os.urandom(36 << 10) for _ in range(8)]  # one prompt's blocks, packed into one message
def packed_message():
    chunks = [pb.KVBlockChunk(block_hash=j, data=data[j], last=True) for j in range(8)]
    return pb.GetBlocksResponse(chunk=chunks[0], more_chunks=chunks[1:]).SerializeToString()
def burst_activation():  # a 50-prompt burst's hidden states through a 512-wide layer: 13 MB
    import torch  # after the messages: importing it leaves glibc's thresholds raised
    torch.set_num_threads(1)  # one worker's torch, as the services run it
    return torch.empty(6400 * 512, dtype=torch.float32).fill_(1.0).sum()
for name, call in (("packed_message", packed_message), ("burst_activation", burst_activation)):
    for _ in range(10):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        call()
    print(name, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 50)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_a_serving_process_reuses_the_memory_its_last_call_freed():
    def faults_per_call(mode: str) -> dict[str, float]:
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS_PER_CALL, mode],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return {name: float(n) for name, n in (line.split() for line in out.stdout.splitlines())}

    default, serving = faults_per_call("default"), faults_per_call("serving")
    # glibc's defaults map each ~300 KB message afresh and fault in every page of it and
    # of its buffers (225-270 faults a message here).
    assert default["packed_message"] > 50
    assert serving["packed_message"] < 5
    # Large blocks stay reused too: a threshold below them would map each one afresh and
    # fault in all of its 3,200 pages (a clean CI run saw 128 here once, from elsewhere).
    assert serving["burst_activation"] < 320


def test_a_client_keeps_to_a_chunk_a_message_for_a_store_that_does_not_read_packed_puts(kv_blocks):
    """A store older than PutBlocksRequest.more_chunks would drop them: a client packs
    only after a store's reply says it reads them."""

    async def scenario():
        async with running_store() as store, KVStoreClient(store.address) as client:
            sent: list[pb.PutBlocksRequest] = []
            put_blocks = client.stub.PutBlocks

            async def like_an_old_store(requests, **kwargs):
                sent.extend(requests)
                response = await put_blocks(iter(sent), **kwargs)
                response.ClearField("reads_more_chunks")
                return response

            client.stub.PutBlocks = like_an_old_store
            for _ in range(2):
                await client.put_blocks([(h, data) for h, data, _ in kv_blocks])
            return sent, client.packs_puts

    sent, packs = run(scenario())
    assert not packs and [len(r.more_chunks) for r in sent] == [0] * 2 * len(kv_blocks)


def test_blocks_from_the_store_give_another_engine_the_same_tokens(tiny_models, engine, prompt, kv_blocks):
    from cleave.engine.config import EngineConfig
    from cleave.engine.kv_transfer import KVBlock
    from cleave.engine.llm_engine import LLMEngine
    from cleave.engine.sampling_params import SamplingParams

    async def scenario():
        async with running_store() as store, KVStoreClient(store.address, chunk_bytes=3000) as client:
            await client.put_blocks([(h, data) for h, data, _ in kv_blocks])
            return await client.get_blocks(engine.block_hashes(prompt))

    fetched = run(scenario())
    other = LLMEngine(EngineConfig(model=str(tiny_models["llama"]), num_kv_blocks=64, max_model_len=512))
    assert other.import_blocks([KVBlock.from_bytes(fetched[h]) for h in other.block_hashes(prompt)]) == 4
    params = SamplingParams(temperature=0, max_tokens=8)
    other.add_request("r", prompt, params)
    outputs = []
    while other.has_unfinished():
        outputs.extend(other.step())
    assert outputs[-1].num_cached_tokens == 4 * 16
    assert [t for o in outputs for t in o.new_token_ids] == engine.generate([prompt], params)[0]


# -- the service over gRPC ------------------------------------------------------------------


def test_unknown_hashes_are_left_out_and_contains_reports_the_prefix(redis_url):
    async def scenario():
        async with running_store(redis_url) as store, KVStoreClient(store.address) as client:
            await client.put_blocks([(11, b"a" * 10), (12, b"b" * 10), (14, b"d" * 10)])
            got = await client.get_blocks([11, 13, 12, 99])
            raw = await client.stub.Contains(pb.ContainsRequest(block_hashes=[11, 12, 13, 14]))
            stats = await client.stats()
            return got, raw, stats, metric(store.metrics_port, "cleave_kvstore_misses_total", op="get")

    got, contains, stats, misses = run(scenario())
    assert got == {11: b"a" * 10, 12: b"b" * 10}
    assert list(contains.present) == [True, True, False, True] and contains.num_prefix_present == 2
    assert (stats.num_blocks, stats.num_bytes, stats.num_misses) == (3, 30, 3)
    assert misses == 2


def test_lru_eviction_under_a_small_capacity_updates_the_redis_index(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    block = 100_000
    capacity_mb = 3 * block / 2**20  # room for three blocks

    async def scenario():
        async with running_store(redis_url, capacity_mb=capacity_mb, instance_id="lru") as store:
            async with KVStoreClient(store.address, chunk_bytes=30_000) as client:
                await client.put_blocks([(1, b"1" * block), (2, b"2" * block), (3, b"3" * block)])
                assert [r.get(index_key(h)) for h in (1, 2, 3)] == ["lru"] * 3
                await client.get_blocks([1])  # 2 becomes the least recently used
                put = await client.put_blocks([(4, b"4" * block)])
                present = await client.contains([1, 2, 3, 4])
                evictions = metric(store.metrics_port, "cleave_kvstore_evictions_total")
                return put, present, evictions

    put, present, evictions = run(scenario())
    assert put.num_evicted == 1 and evictions == 1
    assert present == [True, False, True, True]
    assert r.get(index_key(2)) is None
    # Drained: the store withdrew what it had indexed.
    assert [r.get(index_key(h)) for h in (1, 3, 4)] == [None] * 3
    assert r.exists(store_blocks_key("lru")) == 0


def test_index_tracks_evictions_while_the_store_runs(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    async def scenario():
        async with running_store(redis_url, capacity_mb=2 * 1000 / 2**20, instance_id="live") as store:
            async with KVStoreClient(store.address) as client:
                for h in range(1, 6):
                    await client.put_blocks([(h, bytes([h]) * 1000)])
                return {h: r.get(index_key(h)) for h in range(1, 6)}, r.smembers(store_blocks_key("live"))

    indexed, members = run(scenario())
    assert indexed == {1: None, 2: None, 3: None, 4: "live", 5: "live"}
    assert members == {"4", "5"}


def test_eviction_never_deletes_another_stores_index_entry(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    async def scenario():
        async with running_store(redis_url, capacity_mb=1000 / 2**20, instance_id="a") as a:
            async with KVStoreClient(a.address) as client:
                await client.put_blocks([(1, b"x" * 1000)])
                r.set(index_key(1), "b")  # block 1 has since been written to store b
                await client.put_blocks([(2, b"y" * 1000)])  # a evicts its copy of 1
                return r.get(index_key(1)), r.get(index_key(2))

    assert run(scenario()) == ("b", "a")


def test_pins_prevent_eviction_until_their_ttl_lapses():
    clock = FakeClock()
    backend = MemoryBackend(3000, clock=clock)

    async def scenario():
        async with running_store(backend=backend) as store, KVStoreClient(store.address) as client:
            await client.put_blocks([(1, b"1" * 1000)], pin_ttl_seconds=10)
            await client.put_blocks([(2, b"2" * 1000), (3, b"3" * 1000)])
            assert await client.pin([3, 42], ttl_seconds=5) == [True, False]
            assert (await client.stats()).num_pinned == 2
            await client.put_blocks([(4, b"4" * 1000)])  # 1 and 3 are pinned: 2 goes
            assert await client.contains([1, 2, 3, 4]) == [True, False, True, True]
            await client.pin([4], ttl_seconds=5)
            with pytest.raises(grpc.aio.AioRpcError) as full:
                await client.put_blocks([(5, b"5" * 1000)])
            assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            clock.now += 6  # the pins of 3 and 4 lapse; 1's has 4 s left
            await client.put_blocks([(5, b"5" * 1000)])
            assert await client.contains([1, 3, 4, 5]) == [True, False, True, True]
            assert await client.pin([1], ttl_seconds=0) == [True]  # unpinned early: LRU again
            await client.put_blocks([(6, b"6" * 1000)])
            assert await client.contains([1, 4, 5, 6]) == [False, True, True, True]

    run(scenario())


def _chunk(block_hash=None, data=b"x", last=True, token_ids=(), pin=0.0):
    chunk = pb.KVBlockChunk(data=data, last=last, token_ids=token_ids)
    if block_hash is not None:
        chunk.block_hash = block_hash
    return pb.PutBlocksRequest(chunk=chunk, pin_ttl_seconds=pin)


def _packed(*requests):
    """One message carrying the chunks of ``requests``."""
    first, *rest = requests
    return pb.PutBlocksRequest(chunk=first.chunk, more_chunks=[r.chunk for r in rest],
                               pin_ttl_seconds=first.pin_ttl_seconds)


@pytest.mark.parametrize(
    "stream, message",
    [
        ([_chunk(None)], "no block_hash"),
        ([_chunk(5, last=False), _chunk(6)], "block_hash 6 before block 5 ended"),
        ([_chunk(5, last=False)], "ended inside block 5"),
        ([_chunk(5, data=b"")], "block 5 is empty"),
        ([_chunk(5, last=False, token_ids=[1]), _chunk(5, token_ids=[2])], "first chunk only"),
        ([_chunk(5, pin=-1.0)], "pin_ttl_seconds"),
        ([_packed(_chunk(5, last=False), _chunk(7))], "chunk 3 has block_hash 7 before block 5 ended"),
        ([_packed(_chunk(5, last=False), _chunk(None))], "chunk 3 has no block_hash"),
    ],
    ids=["no-hash", "hash-changes-mid-block", "no-last", "empty", "late-token-ids", "negative-pin",
         "packed-hash-changes", "packed-no-hash"],
)
def test_malformed_put_streams_are_invalid_argument(redis_url, stream, message):
    r = redis.Redis.from_url(redis_url, decode_responses=True)

    async def scenario():
        async with running_store(redis_url, instance_id="bad") as store, KVStoreClient(store.address) as client:
            good = [_chunk(1, data=b"ab", last=False, token_ids=[9]), _chunk(1, data=b"cd")]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.stub.PutBlocks(iter(good + stream))
            # Completed blocks before the error stay stored and indexed; the store serves on.
            assert r.get(index_key(1)) == "bad"
            stored = await client.get_stored_blocks([1, 5, 6])
            assert await client.put_blocks([(7, b"z")])
            return error.value, stored, metric(
                store.metrics_port, "cleave_kvstore_rejected_requests_total", code="INVALID_ARGUMENT"
            )

    error, stored, rejected = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert list(stored) == [1] and stored[1] == StoredBlock(b"abcd", (9,))
    assert rejected == 1


def test_a_block_larger_than_the_store_is_resource_exhausted():
    async def scenario():
        async with running_store(capacity_mb=1000 / 2**20) as store, KVStoreClient(store.address, 300) as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.put_blocks([(1, b"x" * 1001)])
            return error.value, (await client.stats()).num_blocks

    error, num_blocks = run(scenario())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in error.details()
    assert num_blocks == 0


def test_health_turns_not_serving_on_drain_and_reflection_lists_the_service(redis_url):
    async def scenario():
        async with running_store(redis_url, instance_id="hc") as store:
            channel = grpc.aio.insecure_channel(store.address)
            health = health_pb2_grpc.HealthStub(channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert check.status == health_pb2.HealthCheckResponse.SERVING

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
            services = [s.name async for reply in replies for s in reply.list_services_response.service]
            assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
            assert [i.instance_id for i in Registry.from_url(redis_url).list_instances("kvstore")] == ["hc"]

            watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            drain = asyncio.create_task(store.drain(grace=5))
            assert (await asyncio.wait_for(watch.read(), 5)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Deregistered during the drain, not after a TTL.
            assert Registry.from_url(redis_url).list_instances("kvstore") == []
            # The watch ends rather than holding the drain for its grace period.
            assert await asyncio.wait_for(watch.read(), 5) is grpc.aio.EOF
            await drain
            assert time.monotonic() - started < 4
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
            await channel.close()

    run(scenario())


def test_a_hanging_drain_step_is_reported_with_its_stack_and_the_drain_ends(monkeypatch, caplog):
    monkeypatch.setattr(grpc_server, "DRAIN_STEP_SECONDS", 0.3)

    async def never_closes() -> None:
        await asyncio.Event().wait()

    async def scenario():
        async with running_store() as store:
            store.grpc.after_stop(never_closes)
            started = time.monotonic()
            await store.drain(0)
            return store.grpc, time.monotonic() - started

    with caplog.at_level(logging.ERROR, logger="cleave.grpc"):
        server, took = run(scenario())
    assert server.drain_overruns == [never_closes.__qualname__]
    assert took < 10  # the bound (0.3 s) and the other steps, not forever
    [record] = [r for r in caplog.records if r.getMessage() == "drain step overran; going on"]
    assert record.step == never_closes.__qualname__
    assert "in never_closes" in record.stacks and "await asyncio.Event().wait()" in record.stacks


def test_the_process_registers_serves_and_drains_on_sigterm(redis_url, tmp_path):
    registry = Registry.from_url(redis_url)
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cleave.kvstore", "--port", "0", "--metrics-port", "0", "--instance-id", "proc",
         "--capacity-mb", "1"],
        env={**os.environ, "CLEAVE_REDIS_URL": redis_url},
        stderr=open(tmp_path / "kvstore.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while not (live := registry.list_instances("kvstore")):
            assert proc.poll() is None, (tmp_path / "kvstore.log").read_text()
            assert time.monotonic() < deadline, "the store never registered"
            time.sleep(0.02)
        (record,) = live
        assert record.capabilities["capacity_bytes"] == 2**20 and record.load["num_blocks"] == 0

        async def use():
            async with KVStoreClient(record.address) as client:
                await client.put_blocks([(77, b"kv" * 500)])
                return await client.get_blocks([77])

        assert run(use()) == {77: b"kv" * 500}
        assert r.get(index_key(77)) == "proc"
        deadline = time.monotonic() + 10
        while registry.get("kvstore", "proc").load.get("num_blocks") != 1:
            assert time.monotonic() < deadline, "load was never reported"
            time.sleep(0.02)
        assert metric(record.capabilities["metrics_port"], "cleave_kvstore_stored_bytes") == 1000

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert registry.list_instances("kvstore") == []
        assert r.get(index_key(77)) is None
        log = (tmp_path / "kvstore.log").read_text()
        assert '"msg": "draining"' in log and '"msg": "stopped"' in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_restarted_store_withdraws_its_stale_index_entries(redis_url):
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    r.set(index_key(5), "again")
    r.sadd(store_blocks_key("again"), "5")  # left by a crashed previous life

    async def scenario():
        async with running_store(redis_url, instance_id="again"):
            return r.get(index_key(5))

    assert run(scenario()) is None


def test_metrics_count_hits_misses_and_transfers():
    async def scenario():
        async with running_store() as store, KVStoreClient(store.address) as client:
            await client.put_blocks([(1, b"a" * 300), (2, b"b" * 200)])
            await client.get_blocks([1, 2, 3])
            await client.contains([1, 9])
            port = store.metrics_port
            return {
                "hits_get": metric(port, "cleave_kvstore_hits_total", op="get"),
                "misses_get": metric(port, "cleave_kvstore_misses_total", op="get"),
                "hits_contains": metric(port, "cleave_kvstore_hits_total", op="contains"),
                "in": metric(port, "cleave_kvstore_transfer_bytes_total", direction="in"),
                "out": metric(port, "cleave_kvstore_transfer_bytes_total", direction="out"),
                "puts": metric(port, "cleave_kvstore_transfer_seconds_count", op="put"),
                "stored": metric(port, "cleave_kvstore_stored_bytes"),
                "blocks": metric(port, "cleave_kvstore_stored_blocks"),
            }

    assert run(scenario()) == {
        "hits_get": 2, "misses_get": 1, "hits_contains": 1, "in": 500, "out": 500, "puts": 1, "stored": 500,
        "blocks": 2,
    }


# -- placement over several stores -------------------------------------------------------------


def _records(*ids):
    return [InstanceRecord("kvstore", i, f"127.0.0.1:{n}") for n, i in enumerate(ids, 1)]


def test_rendezvous_spreads_blocks_and_moves_only_what_a_new_store_wins():
    hashes = range(1, 3001)
    before = {h: choose_store(h, _records("s1", "s2", "s3")).instance_id for h in hashes}
    counts = {s: list(before.values()).count(s) for s in ("s1", "s2", "s3")}
    assert all(800 < c < 1200 for c in counts.values()), counts
    # Order of the instance list does not matter.
    assert before == {h: choose_store(h, _records("s3", "s1", "s2")).instance_id for h in hashes}
    after = {h: choose_store(h, _records("s1", "s2", "s3", "s4")).instance_id for h in hashes}
    moved = [h for h in hashes if before[h] != after[h]]
    assert all(after[h] == "s4" for h in moved) and 500 < len(moved) < 1000
    assert group_by_store([5, 6, 7], _records("s1", "s2"))  # every hash lands somewhere
    with pytest.raises(LookupError):
        choose_store(1, [])


def test_pool_puts_each_block_on_its_store_and_finds_it_after_a_store_joins(redis_url):
    import redis.asyncio as aioredis

    blocks = [(h, f"block-{h}".encode()) for h in range(100, 130)]

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        pool = KVStorePool(client)
        async with running_store(redis_url, instance_id="p1") as s1, running_store(redis_url, instance_id="p2") as s2:
            await pool.refresh()
            results = await pool.put_blocks(blocks)
            assert set(results) == {"p1", "p2"}
            for store in (s1, s2):
                mine = [h for h, _ in blocks if choose_store(h, list(pool.instances.values())).instance_id == store.config.instance_id]
                assert sorted(store.backend.hashes()) == mine
            async with running_store(redis_url, instance_id="p3"):
                await pool.refresh()
                assert set(pool.instances) == {"p1", "p2", "p3"}
                # Some blocks now hash to p3, which never saw them; the index finds them.
                assert any(choose_store(h, list(pool.instances.values())).instance_id == "p3" for h, _ in blocks)
                got = await pool.get_blocks([h for h, _ in blocks] + [999])
        await pool.close()
        await client.aclose()
        return got

    assert run(scenario()) == dict(blocks)


def test_a_handoff_reads_its_only_store_without_asking_the_index_and_follows_the_index_among_several(
        redis_url, kv_blocks, prompt):
    import redis.asyncio as aioredis
    from cleave.common.kv_handoff import KVHandoff

    blocks = [block for _, _, block in kv_blocks]
    hashes = [block.block_hash for block in blocks]
    tokens = prompt[: 16 * len(blocks)]
    first = f"h1-{os.getpid()}"
    # A second store that rendezvous hashing gives some of the blocks: only the index
    # still says they are on the first.
    second = next(f"h2-{os.getpid()}-{n}" for n in itertools.count()
                  if any(choose_store(h, _records(first, f"h2-{os.getpid()}-{n}")).instance_id != first for h in hashes))

    async def scenario():
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        lookups: list[int] = []
        mget = client.mget

        async def counted_mget(keys, *args):
            lookups.append(len(keys))
            return await mget(keys, *args)

        client.mget = counted_mget
        handoff = KVHandoff(client, timeout=10, pin_ttl_seconds=0)
        async with running_store(redis_url, instance_id=first) as s1:
            one = [InstanceRecord("kvstore", first, s1.address)]
            stored, _ = await handoff.put_missing(blocks, one, ask_first=False)
            assert stored == hashes
            found, stats = await handoff.fetch(hashes, tokens, 16, one)
            assert [b.block_hash for b in found] == hashes and stats.num_errors == 0
            assert lookups == []  # one store: nothing for the index to decide
            async with running_store(redis_url, instance_id=second) as s2:
                two = [*one, InstanceRecord("kvstore", second, s2.address)]
                found, stats = await handoff.fetch(hashes, tokens, 16, two)
                assert [b.block_hash for b in found] == hashes and stats.num_errors == 0
                assert lookups == [len(hashes)]
        await handoff.close()
        await client.aclose()

    run(scenario())


# -- the memory tier on its own ------------------------------------------------------------------


def test_memory_tier_lru_order_replacement_and_full_errors():
    clock = FakeClock()
    tier = MemoryBackend(300, clock=clock)
    assert tier.put(1, StoredBlock(b"a" * 100)) == []
    assert tier.put(2, StoredBlock(b"b" * 100)) == []
    assert tier.put(1, StoredBlock(b"A" * 100)) == []  # replacing does not double count
    assert tier.stats().num_bytes == 200 and tier.hashes() == [2, 1]
    assert tier.put(3, StoredBlock(b"c" * 100)) == []
    assert tier.contains(2) and tier.hashes() == [2, 1, 3]  # contains is not a use
    assert tier.get(2).data == b"b" * 100 and tier.hashes() == [1, 3, 2]
    assert tier.put(4, StoredBlock(b"d" * 150)) == [1, 3]
    assert tier.stats().num_evictions == 2 and tier.stats().num_bytes == 250
    assert tier.pin(2, 5) and tier.pin(4, 5) and not tier.pin(9, 5)
    with pytest.raises(StoreFullError):
        tier.put(5, StoredBlock(b"e" * 100))
    assert tier.hashes() == [2, 4] and tier.stats().num_bytes == 250  # nothing was evicted
    with pytest.raises(StoreFullError):
        tier.put(6, StoredBlock(b"f" * 301))
    assert tier.pin(4, 1) and tier.is_pinned(4)  # a shorter pin does not cut a longer one
    clock.now += 2
    assert tier.is_pinned(4)
    clock.now += 4
    assert not tier.is_pinned(4) and tier.stats().num_pinned == 0
    assert tier.remove(2) and not tier.remove(2) and tier.get(2) is None
    with pytest.raises(ValueError):
        tier.pin(4, 0)


def test_memory_tier_counts_live_pins_as_they_lapse_extend_and_go():
    clock = FakeClock()
    tier = MemoryBackend(1 << 20, clock=clock)
    for block_hash in range(10):
        tier.put(block_hash, StoredBlock(b"x" * 10))
        assert tier.pin(block_hash, 1 + block_hash)  # block i's pin lapses at i + 1 s
    assert tier.stats().num_pinned == 10
    assert tier.pin(0, 20) and tier.pin(9, 1)  # 0 extended to 20 s; a shorter pin leaves 9's at 10 s
    assert tier.unpin(5) and tier.remove(6)
    clock.now += 3.5  # 1 and 2 lapse
    assert tier.stats().num_pinned == 10 - 2 - 2
    assert [h for h in range(10) if tier.is_pinned(h)] == [0, 3, 4, 7, 8, 9]
    clock.now += 6.6  # everything but 0 has lapsed
    assert tier.stats().num_pinned == 1 and tier.is_pinned(0)
    assert tier.pin(5, 1) and tier.stats().num_pinned == 2  # re-pinned after an unpin
    clock.now += 10
    assert tier.stats().num_pinned == 0
    # Pins renewed again and again before they lapse do not pile up.
    for _ in range(5000):
        clock.now += 0.001
        assert tier.pin(7, 60)
    assert tier.stats().num_pinned == 1 and len(tier._pin_deadlines) <= 2 + 1024


@pytest.mark.parametrize(
    "overrides",
    [{"port": 70000}, {"capacity_mb": 0}, {"chunk_bytes": 0}, {"chunk_bytes": 1 << 30},
     {"registry_ttl_seconds": 0.1}, {"instance_id": "a:b"}],
)
def test_bad_config_is_rejected(overrides):
    with pytest.raises(ValueError):
        KVStoreConfig(**overrides)


def test_bad_flag_exits_with_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "cleave.kvstore", "--capacity-mb", "-5"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "capacity_mb must be > 0" in result.stderr
