"""What the prefill and decode workers share: the hand-off of a request's KV blocks
through the KV store, the proto <-> engine conversions, and the worker process shell
(config, metrics, registry record with load reports, gRPC server with drain).

Protocol (docs/prefill-decode.md): prefill fetches the longest stored prefix of the
prompt's blocks, computes the rest and the first token, and puts the full blocks the
store lacks; decode fetches the blocks its own prefix cache lacks and continues the
request from the tokens so far with ``num_output_tokens``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from dataclasses import dataclass, field
import time
from typing import Awaitable, Sequence, TypeVar

import grpc
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cleave.common.engine_metrics import EngineStatsCollector
from cleave.common import redis_metrics
from cleave.common.grpc_server import ServiceServer
from cleave.common.metrics_http import MetricsHTTPServer
from cleave.common.startup import prepare_to_serve, run_service
from cleave.common.tasks import cancel_and_wait
from cleave.common.registry import CLIENT_OPTIONS, DEFAULT_REDIS_URL, AsyncRegistration, AsyncRegistry, InstanceRecord
from cleave.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from cleave.engine.config import EngineConfig
from cleave.engine.kv_transfer import KVBlock
from cleave.engine.llm_engine import LLMEngine
from cleave.engine.sampling_params import SamplingParams
from cleave.expert.client import CALL_SECONDS as EXPERT_CALL_SECONDS, RemoteExpertBackend, model_name
from cleave.kvstore.client import KVStoreClient, group_by_store, locate
from cleave.models.config import ModelConfig
from cleave.models.moe import ExpertBackendError
from cleave.modelzoo.registry import resolve
from cleave.common.wire import FAILURE_CAUSE_KEY
from cleave.protogen.cleave.v1 import common_pb2

log = logging.getLogger("cleave.kv_handoff")

T = TypeVar("T")

# Each KV store as its callers see it: a stalled store's queue is invisible to its own
# cleave_kvstore_transfer_seconds. WorkerMetrics serves it.
STORE_CALL_SECONDS = Histogram(
    "cleave_kvstore_client_call_seconds", "KV store calls of one request as the worker sees them, by store and op",
    ["store", "op"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


async def timed_store_call(store: str, op: str, call: Awaitable[T]) -> T:
    """``await call``, its duration (failures included) observed for ``store`` and ``op``."""
    started = time.perf_counter()
    try:
        return await call
    finally:
        STORE_CALL_SECONDS.labels(store, op).observe(time.perf_counter() - started)


# -- the KV store side ----------------------------------------------------------------------


@dataclass(slots=True)
class TransferStats:
    num_blocks: int = 0
    num_bytes: int = 0
    num_errors: int = 0


class KVHandoff:
    """Moves a request's blocks between an engine and the KV stores. A block lives on
    the store rendezvous hashing picks among the live stores (those the request names,
    else the registry's); a read first asks the Redis KV index, which still finds blocks
    written before the set of stores changed."""

    def __init__(self, redis_client: aioredis.Redis | None, timeout: float, pin_ttl_seconds: float) -> None:
        self.redis = redis_client
        self.registry = AsyncRegistry(redis_client) if redis_client is not None else None
        self.timeout = timeout
        self.pin_ttl_seconds = pin_ttl_seconds
        self.stores: list[InstanceRecord] = []
        self._clients: dict[str, KVStoreClient] = {}

    async def refresh(self) -> None:
        if self.registry is not None:
            self.stores = await self.registry.list_instances("kvstore")

    def resolve(self, targets: Sequence[common_pb2.InstanceInfo]) -> list[InstanceRecord]:
        """The stores of one request: its explicit targets, else the registry's live ones."""
        if not targets:
            return self.stores
        records = []
        for target in targets:
            if not target.instance_id or not target.address:
                raise ValueError("every kvstore_targets entry needs instance_id and address")
            records.append(InstanceRecord("kvstore", target.instance_id, target.address))
        return records

    def client(self, address: str) -> KVStoreClient:
        if address not in self._clients:
            self._clients[address] = KVStoreClient(address)
        return self._clients[address]

    async def import_prefix(
        self, engine: AsyncLLMEngine, block_hashes: Sequence[int], token_ids: Sequence[int],
        stores: list[InstanceRecord],
    ) -> TransferStats | None:
        """Bring the stored blocks of ``token_ids`` that the engine would reuse, and lacks,
        into its prefix cache. None when the engine already holds them all."""
        block_size = engine.engine.config.block_size
        # The engine always computes the last token, so a block ending there is of no use.
        usable = list(block_hashes[: (len(token_ids) - 1) // block_size])
        num_local = await engine.num_cached_blocks(usable)
        if num_local == len(usable):
            return None
        blocks, stats = await self.fetch(usable[num_local:], token_ids[num_local * block_size :], block_size, stores)
        if blocks:
            await engine.import_blocks(blocks)
        return stats

    async def fetch(
        self, block_hashes: Sequence[int], token_ids: Sequence[int], block_size: int, stores: list[InstanceRecord]
    ) -> tuple[list[KVBlock], TransferStats]:
        """The longest leading run of ``block_hashes`` the stores hold, checked against
        ``token_ids``. A store error ends the run: the engine then computes the rest."""
        stats = TransferStats()
        if not block_hashes or not stores:
            return [], stats
        by_id = {s.instance_id: s for s in stores}
        try:
            groups = await locate(self.redis, block_hashes, stores)
        except Exception as exc:  # the index is advisory; rendezvous still finds most blocks
            log.warning("KV index lookup failed", extra={"error": str(exc)})
            stats.num_errors += 1
            groups = group_by_store(block_hashes, stores)
        results = await asyncio.gather(
            *(timed_store_call(sid, "get", self.client(by_id[sid].address).get_blocks(hashes, timeout=self.timeout))
              for sid, hashes in groups.items()),
            return_exceptions=True,
        )
        found: dict[int, bytes] = {}
        for sid, result in zip(groups, results):
            if isinstance(result, BaseException):
                log.warning("KV store read failed", extra={"store": sid, "error": str(result)})
                stats.num_errors += 1
                continue
            found.update(result)
        blocks: list[KVBlock] = []
        for index, block_hash in enumerate(block_hashes):
            data = found.get(block_hash)
            if data is None:
                break
            try:
                block = KVBlock.from_bytes(data)
            except ValueError as exc:
                log.warning("KV block unreadable", extra={"block_hash": block_hash, "error": str(exc)})
                break
            expected = tuple(token_ids[index * block_size : (index + 1) * block_size])
            if block.block_hash != block_hash or block.token_ids != expected:
                break
            blocks.append(block)
            stats.num_blocks += 1
            stats.num_bytes += len(data)
        return blocks, stats

    async def put_missing(self, blocks: Sequence[KVBlock], stores: list[InstanceRecord], *,
                          ask_first: bool = True) -> tuple[list[int], TransferStats]:
        """Put the blocks their stores lack (pinning every block for ``pin_ttl_seconds``
        so that decode finds it); returns the hashes now stored, in order, stopping at
        the first that is not. ``ask_first=False`` skips asking each store which blocks it
        holds, for a caller that just found none of them anywhere (a prompt with no cached
        prefix): the answer would be "none" but for a race, and a block another worker
        stored meanwhile is only written again with the same bytes."""
        stats = TransferStats()
        if not blocks or not stores:
            return [], stats
        by_hash = {b.block_hash: b for b in blocks}
        by_id = {s.instance_id: s for s in stores}
        groups = group_by_store(by_hash, stores)
        stored: set[int] = set()

        async def one_store(sid: str, hashes: list[int]) -> None:
            client = self.client(by_id[sid].address)
            missing = hashes
            if ask_first:
                present = await client.contains(hashes, timeout=self.timeout)
                have = [h for h, p in zip(hashes, present) if p]
                if have and self.pin_ttl_seconds:
                    await client.pin(have, self.pin_ttl_seconds, timeout=self.timeout)
                stored.update(have)
                missing = [h for h, p in zip(hashes, present) if not p]
            if not missing:
                return
            payloads = [(h, by_hash[h].to_bytes()) for h in missing]
            result = await client.put_blocks(
                payloads, token_ids={h: by_hash[h].token_ids for h in missing},
                pin_ttl_seconds=self.pin_ttl_seconds, timeout=self.timeout,
            )
            stored.update(result.stored_hashes)
            stats.num_blocks += len(result.stored_hashes)
            stats.num_bytes += result.num_bytes

        results = await asyncio.gather(*(timed_store_call(s, "put", one_store(s, h)) for s, h in groups.items()),
                                       return_exceptions=True)
        for sid, result in zip(groups, results):
            if isinstance(result, BaseException):
                log.warning("KV store write failed", extra={"store": sid, "error": str(result)})
                stats.num_errors += 1
        hashes: list[int] = []
        for block in blocks:
            if block.block_hash not in stored:
                break
            hashes.append(block.block_hash)
        return hashes, stats

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


# -- config ------------------------------------------------------------------------------


@dataclass(slots=True)
class WorkerConfig(EngineConfig):
    """The engine's fields plus a worker process's own; see PrefillConfig, DecodeConfig."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=0, metadata={"help": "gRPC port; 0 picks a free one"})
    advertise_address: str = field(
        default="", metadata={"help": "host:port registered for other services to dial; default: host:port"}
    )
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port; 0 picks a free one"})
    redis_url: str = field(
        default=DEFAULT_REDIS_URL,
        metadata={"help": "Redis for the registry and the KV index; empty: standalone (kvstore_targets only)"},
    )
    instance_id: str = field(default="", metadata={"help": "registry id; default: <role>-<hostname>-<pid>"})
    registry_ttl_seconds: float = field(default=5.0, metadata={"help": "registration expiry without heartbeats"})
    load_report_seconds: float = field(default=0.5, metadata={"help": "how often load is reported to the registry"})
    drain_grace_seconds: float = field(default=10.0, metadata={"help": "time in-flight calls get to finish on SIGTERM"})
    kvstore_timeout_seconds: float = field(default=30.0, metadata={"help": "deadline of one KV store call"})
    kv_pin_seconds: float = field(
        default=60.0, metadata={"help": "pin blocks put or reused this long, so the next stage finds them; 0: no pin"}
    )
    expert_backend: str = field(
        default="local",
        metadata={"help": "where an MoE model's routed experts run: 'local' (in this process) or 'remote' "
                          "(expert replicas of this model found in the registry at redis_url; not loaded here)"},
    )
    expert_timeout_seconds: float = field(default=10.0, metadata={"help": "deadline of one expert replica call"})

    def __post_init__(self) -> None:
        EngineConfig.__post_init__(self)
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], not {getattr(self, name)}")
        for name in ("registry_ttl_seconds", "load_report_seconds", "kvstore_timeout_seconds", "expert_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("drain_grace_seconds", "kv_pin_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.expert_backend not in ("local", "remote"):
            raise ValueError(f"expert_backend must be 'local' or 'remote', not {self.expert_backend!r}")
        if self.expert_backend == "remote" and not self.redis_url:
            raise ValueError("expert_backend 'remote' finds the expert replicas in the registry: set redis_url")
        if not self.instance_id:
            self.instance_id = f"{self.role}-{socket.gethostname()}-{os.getpid()}"
        if ":" in self.instance_id:
            raise ValueError(f"instance_id must not contain ':', got {self.instance_id!r}")

    @property
    def role(self) -> str:
        raise NotImplementedError

    def engine_config(self, model_path: str | None = None) -> EngineConfig:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)}
        if model_path is not None:
            values["model"] = model_path
        return EngineConfig(**values)


def remote_expert_backend(config: WorkerConfig, model_path: str) -> RemoteExpertBackend:
    """The expert replicas of this model (by folder name, as replicas register it)."""
    if not ModelConfig.from_pretrained(model_path).is_moe:
        raise ValueError(f"expert_backend 'remote' needs a Mixture-of-Experts model; {config.model} is dense")
    backend = RemoteExpertBackend.from_registry(
        config.redis_url, model=model_name(model_path), timeout=config.expert_timeout_seconds
    )
    log.info("experts run in expert replicas", extra={
        "model": model_name(model_path), "num_replicas": len(backend.replicas)})
    return backend




def request_tokens(request_id: str, token_ids: Sequence[int], when_empty: str) -> list[int]:
    """The token ids of a prefill or decode request; ValueError when it names no request
    or carries no tokens (``when_empty`` says what the caller should have sent)."""
    if not request_id:
        raise ValueError("request_id is required")
    if not token_ids:
        raise ValueError(f"token_ids is empty: {when_empty}")
    return list(token_ids)


async def abort_invalid(metrics: "WorkerMetrics", context: grpc.aio.ServicerContext, exc: ValueError) -> None:
    metrics.requests.labels(outcome="invalid").inc()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


class RequestFailed(Exception):
    """How a worker's request failed: the status its call ends with and the shared
    dependency it blames (``cause``, sent as trailing metadata), if any."""

    def __init__(self, code: grpc.StatusCode, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.cause = cause

    @classmethod
    def from_engine_error(cls, exc: EngineDeadError | EngineStepError) -> "RequestFailed":
        """UNAVAILABLE when the engine is gone or the expert pool failed a step (a later
        try may succeed; the cause ``experts`` tells a router that every worker would fail
        alike); INTERNAL for any other failed step."""
        if isinstance(exc, EngineStepError) and isinstance(exc.__cause__, ExpertBackendError):
            return cls(grpc.StatusCode.UNAVAILABLE, str(exc), "experts")
        code = grpc.StatusCode.INTERNAL if isinstance(exc, EngineStepError) else grpc.StatusCode.UNAVAILABLE
        return cls(code, str(exc))

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(self.code, self.message,
                            trailing_metadata=((FAILURE_CAUSE_KEY, self.cause),) if self.cause else ())


async def abort_engine_error(context: grpc.aio.ServicerContext, exc: EngineDeadError | EngineStepError) -> None:
    await RequestFailed.from_engine_error(exc).abort(context)


# -- metrics -----------------------------------------------------------------------------


class WorkerMetrics(MetricsHTTPServer):
    """``cleave_<role>_*`` in a registry of its own, so that several workers can share
    one test process."""

    def __init__(self, role: str, instance_id: str, engine: AsyncLLMEngine) -> None:
        super().__init__(CollectorRegistry(), f"{role}-metrics")
        r = self.registry
        p = f"cleave_{role}_"
        self.requests = Counter(p + "requests", "Requests by outcome (ok, invalid, error, cancelled)", ["outcome"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Tokens received with requests", registry=r)
        self.cached_tokens = Counter(p + "cached_tokens", "Tokens whose KV was reused, not computed", registry=r)
        self.generated_tokens = Counter(p + "generated_tokens", "Tokens generated", registry=r)
        self.kv_blocks = Counter(p + "kv_blocks", "KV blocks moved, by direction (fetched, put)", ["direction"], registry=r)
        self.kv_bytes = Counter(p + "kv_bytes", "KV block bytes moved, by direction (fetched, put)", ["direction"], registry=r)
        self.kv_errors = Counter(p + "kv_errors", "Failed KV store calls (the request goes on)", registry=r)
        self.request_seconds = Histogram(
            p + "request_seconds", "Duration of a call", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        Gauge(p + "info", "Constant 1, labelled with the instance", ["instance_id"], registry=r).labels(instance_id).set(1)
        for name, doc, key in (
            ("running_requests", "Sequences in the running batch", "num_running"),
            ("waiting_requests", "Sequences waiting for admission", "num_waiting"),
            ("free_kv_blocks", "Free KV blocks of the engine's pool", "num_free_kv_blocks"),
            ("kv_pool_blocks", "KV blocks of the engine's pool", "num_kv_blocks"),
        ):
            Gauge(p + name, doc, registry=r).set_function(lambda key=key: engine.stats().get(key, 0))
        r.register(EngineStatsCollector(p, engine.stats))
        r.register(EXPERT_CALL_SECONDS)
        r.register(STORE_CALL_SECONDS)

    def count_transfer(self, direction: str, stats: TransferStats) -> None:
        self.kv_blocks.labels(direction=direction).inc(stats.num_blocks)
        self.kv_bytes.labels(direction=direction).inc(stats.num_bytes)
        self.kv_errors.inc(stats.num_errors)


# -- the process shell ---------------------------------------------------------------------


class WorkerServer:
    """An engine, its gRPC server, metrics and registry record. Subclasses set
    ``service_name``, add their servicer in :meth:`add_servicer` and may extend :meth:`load`."""

    service_name = ""

    def __init__(self, config: WorkerConfig, engine: AsyncLLMEngine | None = None) -> None:
        self.config = config
        self.expert_backend: RemoteExpertBackend | None = None
        if engine is None:
            model_path = config.model and str(resolve(config.model))
            if config.expert_backend == "remote":
                self.expert_backend = remote_expert_backend(config, model_path)
            engine = AsyncLLMEngine(engine=LLMEngine(config.engine_config(model_path), self.expert_backend))
        self.engine = engine
        self.metrics = WorkerMetrics(config.role, config.instance_id, self.engine)
        self.redis: aioredis.Redis | None = None
        self.handoff: KVHandoff | None = None
        self.grpc: ServiceServer | None = None
        self.registration: AsyncRegistration | None = None
        self.metrics_port: int | None = None
        self._load_task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        assert self.grpc is not None, "start() first"
        return self.grpc.address

    def add_servicer(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    def capabilities(self) -> dict[str, object]:
        """What a subclass adds to the registry record's capabilities."""
        return {}

    def load(self) -> dict[str, float]:
        """What the registry record reports as load; subclasses add their own keys."""
        stats = self.engine.stats()
        return {key: stats[key] for key in ("num_running", "num_waiting", "num_requests", "num_free_kv_blocks")}

    async def start(self, install_signal_handlers: bool = False) -> None:
        """Serve, then register. With ``install_signal_handlers`` SIGTERM/SIGINT drain
        from the moment the server is up, so that a signal during registration is not fatal."""
        config = self.config
        self.engine.start()
        if config.redis_url:
            self.redis = redis_metrics.async_client(config.redis_url, decode_responses=True, **CLIENT_OPTIONS)
        self.handoff = KVHandoff(self.redis, config.kvstore_timeout_seconds, config.kv_pin_seconds)
        await self.handoff.refresh()
        self.grpc = ServiceServer(
            config.host, config.port, [self.service_name], drain_grace=config.drain_grace_seconds,
            advertise=config.advertise_address,
        )
        self.add_servicer(self.grpc.server)
        self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        await self.grpc.start()
        if install_signal_handlers:
            self.grpc.install_signal_handlers()
        if self.redis is not None:
            engine = self.engine.engine
            record = InstanceRecord(
                config.role, config.instance_id, self.grpc.address,
                capabilities={
                    "model": config.model, "block_size": config.block_size, "root_hash": str(engine.root_hash),
                    "max_model_len": engine.max_model_len, "metrics_port": self.metrics_port,
                    "expert_backend": config.expert_backend, **self.capabilities(),
                },
                load=self.load(),
            )
            self.registration = await self.grpc.register(AsyncRegistry(self.redis), record, config.registry_ttl_seconds)
        self._load_task = asyncio.create_task(self._report_load(), name=f"load-{config.instance_id}")
        self.grpc.after_stop(self._close)
        log.info(f"{config.role} ready", extra={"address": self.grpc.address, "metrics_port": self.metrics_port,
                                                 "instance_id": config.instance_id})

    async def _report_load(self) -> None:
        while True:
            await asyncio.sleep(self.config.load_report_seconds)
            if self.registration is not None:
                self.registration.update_load(**self.load())
            try:
                await self.handoff.refresh()
            except Exception as exc:  # keep the last known stores
                log.warning("kvstore refresh failed", extra={"error": str(exc)})

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, deregister, finish in-flight calls within ``grace``, stop."""
        assert self.grpc is not None, "start() first"
        await self.grpc.drain(grace)

    async def _close(self) -> None:
        await cancel_and_wait(self._load_task)  # it asks Redis: one cancel may not take
        await asyncio.to_thread(self.engine.shutdown)
        if self.expert_backend is not None:
            self.expert_backend.close()
        if self.handoff is not None:
            await self.handoff.close()
        if self.redis is not None:
            await self.redis.aclose()
        self.metrics.close()


def run_worker(role: str, config_cls: type, server_cls: type, command: str, argv: Sequence[str]) -> int:
    """``cleave <role>`` / ``python -m cleave.<role>``: serve until SIGTERM/SIGINT drain."""
    import argparse

    from cleave.common import config as typed_config
    from cleave.common import logging as cleave_logging

    if command != role:
        raise SystemExit(f"cleave.{role}.main cannot run {command!r}")
    parser = argparse.ArgumentParser(prog=f"cleave {role}", description=config_cls.__doc__)
    typed_config.add_arguments(parser, config_cls)
    namespace = parser.parse_args(argv)
    try:
        config = typed_config.from_namespace(config_cls, namespace)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logger = cleave_logging.setup(role)

    async def serve() -> int:
        server = server_cls(config)
        await server.start(install_signal_handlers=True)
        prepare_to_serve()
        await server.grpc.wait_for_termination()
        return 0

    try:
        return run_service(serve())
    except (OSError, ValueError) as exc:
        logger.error(f"{role} failed to start", extra={"error": str(exc)})
        return 1

