"""Prefill and decode workers whose MoE experts run in expert replicas
(``expert_backend=remote``): real Redis, real gRPC on 127.0.0.1, a KV store, two replicas
splitting the experts. Output through prefill -> decode equals transformers' greedy, the
workers hold no routed expert weights, losing every replica of some expert fails requests
fast with UNAVAILABLE naming the experts, and a replacement replica takes over exactly."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field

import grpc
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from reference import assert_greedy_equal, load_hf, mixed_prompts
from test_expert import ThreadReplica
from test_prefill_decode import generate, greedy, metric

from cleave.common.wire import collect_prefill
from cleave.common.registry import Registry
from cleave.decode.config import DecodeConfig
from cleave.decode.service import DecodeServer
from cleave.expert.spec import parse_canonical
from cleave.kvstore.config import KVStoreConfig
from cleave.kvstore.service import KVStoreServer
from cleave.launcher import wait_until
from cleave.models.loader import load_model
from cleave.prefill.config import PrefillConfig
from cleave.prefill.service import PrefillServer
from cleave.protogen.cleave.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

# No num_threads: torch.set_num_threads is process-wide, and would change the float sums of
# later tests that compare threads of this process bit for bit (tests/test_expert.py).
ENGINE = dict(num_kv_blocks=128, max_model_len=256, block_size=16)
SPLIT = ("0-3", "4-7")
MAX_TOKENS = 10
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
MISSING = re.compile(r"no reachable expert replica holds (\S+) \(layer:expert\)")


@dataclass
class RemoteExpertCluster:
    """Two expert replicas (each on a loop of its own), one KV store, and a prefill and
    a decode worker with ``expert_backend=remote`` on one more loop."""

    model_dir: str
    redis_url: str
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    replicas: list[ThreadReplica] = field(default_factory=list)
    servers: list = field(default_factory=list)
    channels: list = field(default_factory=list)

    def __enter__(self) -> "RemoteExpertCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        for i, spec in enumerate(SPLIT):
            self.add_replica(spec, f"expert{i}")
        threading.Thread(target=self.loop.run_forever, name="remote-experts", daemon=True).start()
        common = dict(port=0, metrics_port=0, redis_url=self.redis_url, drain_grace_seconds=1)
        self.servers.append(KVStoreServer(KVStoreConfig(instance_id="kvs-remote", **common)))
        for cls, config_cls in ((PrefillServer, PrefillConfig), (DecodeServer, DecodeConfig)):
            config = config_cls(model=self.model_dir, instance_id=f"{config_cls.__name__}-remote",
                                expert_backend="remote", expert_timeout_seconds=5, **ENGINE, **common)
            self.servers.append(self.call(_make(cls, config)))
        for server in self.servers:
            self.call(server.start())

    def add_replica(self, spec: str, instance_id: str) -> ThreadReplica:
        self.replicas.append(ThreadReplica(self.model_dir, spec, redis_url=self.redis_url, instance_id=instance_id))
        return self.replicas[-1]

    @property
    def prefill(self) -> PrefillServer:
        return self.servers[1]

    @property
    def decode(self) -> DecodeServer:
        return self.servers[2]

    def stubs(self) -> tuple[prefill_pb2_grpc.PrefillStub, decode_pb2_grpc.DecodeStub]:
        prefill, decode = grpc.insecure_channel(self.prefill.address), grpc.insecure_channel(self.decode.address)
        self.channels += [prefill, decode]
        return prefill_pb2_grpc.PrefillStub(prefill), decode_pb2_grpc.DecodeStub(decode)

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        for server in reversed(self.servers):
            if server.grpc is not None:
                self.call(server.drain(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        for replica in self.replicas:
            replica.stop()


async def _make(cls, config):
    # Built on the cluster's loop: the engine thread hands outputs to the loop that asks.
    return cls(config)


def crash(replica: ThreadReplica) -> None:
    """Stop a replica as a crashed process stops: calls refused at once, its registry
    record left to expire."""
    replica._run(replica.server.registration.stop(deregister=False))
    replica.kill()


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def cluster(request, tiny_models, redis_server):
    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    with RemoteExpertCluster(str(tiny_models[request.param]), redis_server) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def hf_model(cluster):
    return load_hf(cluster.model_dir)


def expert_tokens(replica: ThreadReplica) -> float:
    return metric(replica.server.metrics_port, "cleave_expert_tokens_total")


def test_split_greedy_equals_transformers(cluster, hf_model):
    prompts = mixed_prompts(hf_model.config.vocab_size, 8, seed=81, min_len=3, max_len=60)
    prefill, decode = cluster.stubs()
    calls_before, timed_before = num_expert_calls(cluster), timed_expert_calls()
    puts_before = timed_store_puts()
    outputs = [generate(prefill, decode, f"remote-{i}", prompt, greedy(MAX_TOKENS))[0]
               for i, prompt in enumerate(prompts)]
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs)
    assert_greedy_equal(hf_model, prompts, outputs, MAX_TOKENS)
    # Both replicas ran tokens, for both workers, and nothing failed over.
    assert all(expert_tokens(replica) > 0 for replica in cluster.replicas)
    for server in (cluster.prefill, cluster.decode):
        backend = server.expert_backend
        assert backend.num_calls > 0 and backend.num_failovers == 0
        assert {r.instance_id for r in backend.replicas} == {"expert0", "expert1"}
    # The callers timed every call, by the replica's instance id.
    assert wait_until(lambda: timed_expert_calls() - timed_before == num_expert_calls(cluster) - calls_before, 5)
    # ... and every request's put of its blocks to the store.
    assert timed_store_puts() - puts_before == len(prompts)


def num_expert_calls(cluster) -> int:
    return sum(server.expert_backend.num_calls for server in (cluster.prefill, cluster.decode))


def timed_store_puts() -> float:
    from cleave.common.kv_handoff import STORE_CALL_SECONDS

    registry = CollectorRegistry()
    registry.register(STORE_CALL_SECONDS)
    return registry.get_sample_value("cleave_kvstore_client_call_seconds_count", {"store": "kvs-remote", "op": "put"}) or 0


def timed_expert_calls() -> float:
    from cleave.expert.client import CALL_SECONDS

    registry = CollectorRegistry()
    registry.register(CALL_SECONDS)
    return sum(registry.get_sample_value("cleave_expert_client_call_seconds_count", {"replica": r}) or 0
               for r in ("expert0", "expert1"))


def test_workers_hold_no_routed_experts(cluster):
    local = load_model(cluster.model_dir)
    config = local.config
    routed = len(config.moe_layers) * config.num_experts * 3 * config.moe_intermediate_size * config.hidden_size
    registry = Registry.from_url(cluster.redis_url)
    for server in (cluster.prefill, cluster.decode):
        model = server.engine.engine.model
        assert all(block.experts is None for block in model.moe_blocks())
        assert not [name for name, _ in model.named_parameters() if ".experts." in name]
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in local.parameters()) - routed
        # Qwen2-MoE's shared expert stays in the worker, loaded as in the full model.
        for block, full in zip(model.moe_blocks(), local.moe_blocks()):
            assert (block.shared_expert is None) == (full.shared_expert is None)
            if block.shared_expert is not None:
                assert torch.equal(block.shared_expert.gate_up_proj.weight, full.shared_expert.gate_up_proj.weight)
        record = registry.get(server.config.role, server.config.instance_id)
        assert record.capabilities["expert_backend"] == "remote"


def test_lost_experts_fail_fast_then_a_replacement_takes_over(cluster, hf_model, wait_engine_idle):
    prompts = mixed_prompts(hf_model.config.vocab_size, 3, seed=82, min_len=20, max_len=50)
    prefill, decode = cluster.stubs()
    # Prefilled while every expert is served; decoded after the experts are lost.
    first = collect_prefill(prefill.Prefill(prefill_pb2.PrefillRequest(
        request_id="lost-0", token_ids=prompts[0], params=greedy(MAX_TOKENS)), timeout=60))
    lost = cluster.replicas[0]
    crash(lost)

    # expert_timeout_seconds is 5: a request that hung on the lost replica would end
    # in DEADLINE_EXCEEDED at the 60 s deadline, not UNAVAILABLE.
    with pytest.raises(grpc.RpcError) as info:
        collect_prefill(prefill.Prefill(prefill_pb2.PrefillRequest(
            request_id="lost-1", token_ids=prompts[1], params=greedy(MAX_TOKENS)), timeout=60))
    assert info.value.code() == UNAVAILABLE, info.value.details()
    missing = MISSING.search(info.value.details())
    assert missing and parse_canonical(missing.group(1)) <= lost.server.experts.pairs, info.value.details()

    with pytest.raises(grpc.RpcError) as info:
        list(decode.Decode(decode_pb2.DecodeRequest(
            request_id="lost-0", token_ids=prompts[0] + [first.first_token_id], block_hashes=first.block_hashes,
            params=greedy(MAX_TOKENS), num_generated=1), timeout=60))
    assert info.value.code() == UNAVAILABLE, info.value.details()
    missing = MISSING.search(info.value.details())
    assert missing and parse_canonical(missing.group(1)) <= lost.server.experts.pairs, info.value.details()
    for server in (cluster.prefill, cluster.decode):
        assert server.engine.is_running
        wait_engine_idle(server.engine)  # the failed requests' blocks are freed

    # A replacement holding the same experts registers; the same workers serve again.
    replacement = cluster.add_replica(SPLIT[0], "expert-replacement")
    outputs = [generate(prefill, decode, f"replaced-{i}", prompt, greedy(MAX_TOKENS))[0]
               for i, prompt in enumerate(prompts)]
    assert_greedy_equal(hf_model, prompts, outputs, MAX_TOKENS)
    assert expert_tokens(replacement) > 0


# -- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config_cls", [PrefillConfig, DecodeConfig])
@pytest.mark.parametrize("fields, message", [
    (dict(expert_backend="remote", redis_url=""), "set redis_url"),
    (dict(expert_backend="elsewhere"), "expert_backend must be 'local' or 'remote'"),
    (dict(expert_backend="remote", expert_timeout_seconds=0), "expert_timeout_seconds must be > 0"),
])
def test_bad_expert_config_is_refused(config_cls, fields, message):
    with pytest.raises(ValueError, match=message):
        config_cls(model="unused", **fields)


def test_remote_experts_need_an_moe_model(tiny_models, redis_server):
    config = PrefillConfig(model=str(tiny_models["llama"]), expert_backend="remote", redis_url=redis_server,
                           port=0, metrics_port=0)
    with pytest.raises(ValueError, match="needs a Mixture-of-Experts model"):
        PrefillServer(config)


@pytest.mark.parametrize("role, args, code, message", [
    ("prefill", ["--redis-url", ""], 2, "set redis_url"),
    ("decode", [], 1, "needs a Mixture-of-Experts model"),
])
def test_process_refuses_remote_experts_it_cannot_use(tiny_models, redis_server, role, args, code, message):
    command = [sys.executable, "-m", f"cleave.{role}", "--model", str(tiny_models["llama"]),
               "--expert-backend", "remote", "--redis-url", redis_server, "--port", "0", "--metrics-port", "0", *args]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == code, out.stderr[-2000:]
    assert message in out.stderr


def test_skipping_experts_still_refuses_unknown_tensors(tiny_models, tmp_path):
    """The strict check for unused checkpoint tensors holds for everything but the routed experts."""
    source = tiny_models["mixtral"]
    for item in source.iterdir():
        (tmp_path / item.name).symlink_to(item)
    save_file({"model.layers.0.mlp.stray.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    backend = object()  # never called: loading only
    with pytest.raises(ValueError, match="does not use.*stray"):
        load_model(tmp_path, expert_backend=backend)
    with pytest.raises(ValueError, match="dense model"):
        load_model(tiny_models["llama"], expert_backend=backend)
