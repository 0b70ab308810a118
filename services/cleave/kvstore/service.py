"""The KV store's gRPC service (``cleave.v1.KVStore``) and the process around it:
backend, Redis index, registry record, metrics port and graceful drain."""

from __future__ import annotations

import logging
import math
import time
from typing import AsyncIterator, Callable

import grpc
import redis.asyncio as aioredis

from cleave.common import redis_metrics
from cleave.common.grpc_server import ServiceServer
from cleave.common.registry import CLIENT_OPTIONS, AsyncRegistration, AsyncRegistry, InstanceRecord
from cleave.kvstore.backend import StorageBackend, StoredBlock, StoreFullError
from cleave.kvstore.chunks import chunk_messages
from cleave.kvstore.config import KVStoreConfig
from cleave.kvstore.index import KVIndex
from cleave.kvstore.memory import MemoryBackend
from cleave.kvstore.metrics import KVStoreMetrics
from cleave.protogen.cleave.v1 import kvstore_pb2 as pb
from cleave.protogen.cleave.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.kvstore")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStore"].full_name
ROLE = "kvstore"


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(
        self,
        backend: StorageBackend,
        metrics: KVStoreMetrics,
        *,
        instance_id: str,
        chunk_bytes: int,
        index: KVIndex | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.instance_id = instance_id
        self.chunk_bytes = chunk_bytes
        self.index = index
        self.on_change = on_change
        self.num_hits = 0
        self.num_misses = 0

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self.metrics.rejected.labels(code=code.name).inc()
        # Blocks a put stream completed before its error stay stored: the caller hears of
        # the error only once the index names them too.
        await self._flush_index()
        await context.abort(code, message)

    async def _flush_index(self) -> None:
        if self.index is not None and not await self.index.flush():
            self.metrics.index_errors.inc()

    async def PutBlocks(self, request_iterator: AsyncIterator[pb.PutBlocksRequest], context) -> pb.PutBlocksResponse:
        started = time.perf_counter()
        capacity = self.backend.stats().capacity_bytes
        stored: list[int] = []
        num_bytes = num_evicted = 0
        block_hash: int | None = None
        parts: list[bytes] = []
        size = 0
        token_ids: tuple[int, ...] = ()
        pin_ttl = 0.0
        invalid = grpc.StatusCode.INVALID_ARGUMENT
        try:
            index = -1
            async for index, request, chunk in _chunks(request_iterator):
                if not chunk.HasField("block_hash"):
                    await self._abort(context, invalid, f"chunk {index} has no block_hash")
                if block_hash is None:
                    block_hash, token_ids, pin_ttl = chunk.block_hash, tuple(chunk.token_ids), request.pin_ttl_seconds
                    parts, size = [], 0
                    if not (math.isfinite(pin_ttl) and pin_ttl >= 0):
                        await self._abort(context, invalid, f"block {block_hash}: pin_ttl_seconds must be >= 0")
                elif chunk.block_hash != block_hash:
                    await self._abort(
                        context, invalid,
                        f"chunk {index} has block_hash {chunk.block_hash} before block {block_hash} ended (last unset)",
                    )
                elif chunk.token_ids:
                    await self._abort(context, invalid, f"chunk {index}: token_ids belong on a block's first chunk only")
                parts.append(chunk.data)
                size += len(chunk.data)
                self.metrics.transfer_bytes.labels(direction="in").inc(len(chunk.data))
                if size > capacity:
                    await self._abort(
                        context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"block {block_hash} exceeds the store's capacity of {capacity} bytes",
                    )
                if not chunk.last:
                    continue
                if size == 0:
                    await self._abort(context, invalid, f"block {block_hash} is empty")
                try:
                    evicted = self.backend.put(block_hash, StoredBlock(b"".join(parts), token_ids))
                except StoreFullError as exc:
                    await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, f"block {block_hash}: {exc}")
                if pin_ttl > 0:
                    self.backend.pin(block_hash, pin_ttl)
                if self.index is not None:
                    self.index.note_evicted(evicted)
                    self.index.note_stored([block_hash])
                self.metrics.evictions.inc(len(evicted))
                self.metrics.blocks_put.inc()
                stored.append(block_hash)
                num_bytes += size
                num_evicted += len(evicted)
                block_hash, parts = None, []
            if block_hash is not None:
                await self._abort(context, invalid, f"the stream ended inside block {block_hash} (no chunk with last set)")
        finally:
            await self._flush_index()
            self.metrics.transfer_seconds.labels(op="put").observe(time.perf_counter() - started)
            if stored and self.on_change is not None:
                self.on_change()
        return pb.PutBlocksResponse(stored_hashes=stored, num_bytes=num_bytes, num_evicted=num_evicted,
                                    reads_more_chunks=True)

    async def GetBlocks(self, request: pb.GetBlocksRequest, context) -> AsyncIterator[pb.GetBlocksResponse]:
        started = time.perf_counter()
        # Chunks go out packed up to chunk_bytes a message to a reader that takes them
        # (request.packed): a stream message costs both sides more than a block's few
        # tens of kilobytes do.
        out = self.metrics.transfer_bytes.labels(direction="out")

        def present():
            for block_hash in request.block_hashes:
                block = self.backend.get(block_hash)
                self._count(block is not None, "get")
                if block is not None:
                    yield block_hash, block.data, block.token_ids

        try:
            for chunks, num_bytes in chunk_messages(present(), self.chunk_bytes, request.packed):
                yield pb.GetBlocksResponse(chunk=chunks[0], more_chunks=chunks[1:])
                out.inc(num_bytes)
        finally:
            self.metrics.transfer_seconds.labels(op="get").observe(time.perf_counter() - started)

    async def Contains(self, request: pb.ContainsRequest, context) -> pb.ContainsResponse:
        present = [self.backend.contains(h) for h in request.block_hashes]
        for flag in present:
            self._count(flag, "contains")
        prefix = next((i for i, flag in enumerate(present) if not flag), len(present))
        return pb.ContainsResponse(present=present, num_prefix_present=prefix)

    async def PinBlocks(self, request: pb.PinBlocksRequest, context) -> pb.PinBlocksResponse:
        ttl = request.ttl_seconds
        if not (math.isfinite(ttl) and ttl >= 0):
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "ttl_seconds must be >= 0 (0 unpins)")
        if not self.backend.supports_pin:
            await self._abort(context, grpc.StatusCode.UNIMPLEMENTED, "this store's tier does not support pins")
        if ttl > 0:
            present = [self.backend.pin(h, ttl) for h in request.block_hashes]
        else:
            present = [self.backend.unpin(h) for h in request.block_hashes]
        return pb.PinBlocksResponse(present=present)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        s = self.backend.stats()
        return pb.StatsResponse(
            instance_id=self.instance_id, num_blocks=s.num_blocks, num_bytes=s.num_bytes,
            capacity_bytes=s.capacity_bytes, num_pinned=s.num_pinned, num_hits=self.num_hits,
            num_misses=self.num_misses, num_evictions=s.num_evictions,
        )

    def _count(self, hit: bool, op: str) -> None:
        if hit:
            self.num_hits += 1
            self.metrics.hits.labels(op=op, tier=self.metrics.tier).inc()
        else:
            self.num_misses += 1
            self.metrics.misses.labels(op=op, tier=self.metrics.tier).inc()


async def _chunks(requests: AsyncIterator[pb.PutBlocksRequest]) -> AsyncIterator:
    """(index, request, chunk) of every chunk of a PutBlocks stream, ``chunk`` then
    ``more_chunks`` of each message, numbered across the stream."""
    index = 0
    async for request in requests:
        yield index, request, request.chunk
        index += 1
        for chunk in request.more_chunks:
            yield index, request, chunk
            index += 1


class KVStoreServer:
    """A running store: ``await start()``, then ``await drain()`` (or a signal)."""

    def __init__(self, config: KVStoreConfig, backend: StorageBackend | None = None) -> None:
        self.config = config
        self.backend = backend or MemoryBackend(config.capacity_bytes)
        self.metrics = KVStoreMetrics(self.backend, config.instance_id)
        self.redis: aioredis.Redis | None = None
        self.index: KVIndex | None = None
        self.registration: AsyncRegistration | None = None
        self.grpc: ServiceServer | None = None  # made in start(): grpc.aio binds to the running loop
        self.servicer: KVStoreServicer | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server, once started."""
        assert self.grpc is not None, "start() first"
        return self.grpc.address

    async def start(self) -> None:
        """Bind, withdraw stale index entries, serve, then register."""
        config = self.config
        self.grpc = ServiceServer(
            config.host, config.port, [SERVICE_NAME], drain_grace=config.drain_grace_seconds,
            advertise=config.advertise_address,
        )
        if config.redis_url:
            self.redis = redis_metrics.async_client(config.redis_url, decode_responses=True, **CLIENT_OPTIONS)
            self.index = KVIndex(self.redis, config.instance_id)
            # Entries a previous life of this instance id left behind name blocks that
            # died with its memory.
            stale = await self.index.clear()
            if stale:
                log.info("withdrew stale KV index entries", extra={"count": stale})
        self.servicer = KVStoreServicer(
            self.backend, self.metrics, instance_id=config.instance_id, chunk_bytes=config.chunk_bytes,
            index=self.index, on_change=self._report_load,
        )
        pb_grpc.add_KVStoreServicer_to_server(self.servicer, self.grpc.server)
        self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        await self.grpc.start()
        if self.redis is not None:
            record = InstanceRecord(
                ROLE, config.instance_id, self.grpc.address,
                capabilities={
                    "tier": "memory", "capacity_bytes": self.backend.stats().capacity_bytes,
                    "metrics_port": self.metrics_port, "pins": self.backend.supports_pin,
                },
                load=self._load(),
            )
            self.registration = await self.grpc.register(AsyncRegistry(self.redis), record, config.registry_ttl_seconds)
        self.grpc.after_stop(self._close)
        log.info(
            "kvstore ready",
            extra={"address": self.grpc.address, "metrics_port": self.metrics_port,
                   "capacity_bytes": self.backend.stats().capacity_bytes, "instance_id": config.instance_id},
        )

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, deregister, finish in-flight calls, stop, withdraw index entries."""
        assert self.grpc is not None, "start() first"
        await self.grpc.drain(grace)

    async def _close(self) -> None:
        if self.index is not None:
            await self.index.clear()
        if self.redis is not None:
            await self.redis.aclose()
        self.metrics.close()
        self.backend.close()

    def _load(self) -> dict[str, int]:
        s = self.backend.stats()
        return {"num_blocks": s.num_blocks, "num_bytes": s.num_bytes, "num_pinned": s.num_pinned}

    def _report_load(self) -> None:
        if self.registration is not None:
            self.registration.update_load(**self._load())
