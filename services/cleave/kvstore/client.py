"""Talking to KV stores: :class:`KVStoreClient` for one store, :func:`choose_store`
for where a block lives among several, and :class:`KVStorePool` for both together.

A block lives on one store chosen by rendezvous (highest-random-weight) hashing of
its hash over the live kvstore instances: every caller that sees the same instances
picks the same store, and a store joining or leaving moves only the blocks it wins
or held. Readers first ask the Redis KV index, which still finds blocks written
before the set of stores changed."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import grpc
import redis.asyncio as aioredis

from cleave.common.grpc_server import channel_options
from cleave.common.registry import AsyncRegistry, InstanceRecord
from cleave.kvstore import index as kvindex
from cleave.kvstore.chunks import chunk_messages
from cleave.kvstore.backend import StoredBlock
from cleave.protogen.cleave.v1 import kvstore_pb2 as pb
from cleave.protogen.cleave.v1 import kvstore_pb2_grpc as pb_grpc

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PutResult:
    stored_hashes: list[int]
    num_bytes: int
    num_evicted: int


class KVStoreClient:
    """One store over ``grpc.aio``. Create and use it inside one event loop."""

    def __init__(self, address: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        self.address = address
        self.chunk_bytes = chunk_bytes
        self.channel = grpc.aio.insecure_channel(address, options=channel_options())
        self.stub = pb_grpc.KVStoreStub(self.channel)
        # Puts go one chunk a message until the store says it reads packed ones
        # (PutBlocksResponse.reads_more_chunks): a store older than that would drop them.
        self.packs_puts = False

    async def put_blocks(
        self,
        blocks: Iterable[tuple[int, bytes]],
        *,
        token_ids: Mapping[int, Sequence[int]] | None = None,
        pin_ttl_seconds: float = 0.0,
        timeout: float | None = None,
    ) -> PutResult:
        """Store ``(hash, bytes)`` blocks in one stream, each cut into ``chunk_bytes``
        chunks; ``token_ids`` (by hash) travel with the blocks; ``pin_ttl_seconds`` pins
        each block once stored."""
        token_ids = token_ids or {}
        chunk_bytes = self.chunk_bytes
        blocks = list(blocks)
        empty = [block_hash for block_hash, data in blocks if not data]
        if empty:
            raise ValueError(f"blocks {empty} are empty")

        packs = self.packs_puts

        def requests():
            with_tokens = ((block_hash, data, token_ids.get(block_hash, ())) for block_hash, data in blocks)
            for chunks, _ in chunk_messages(with_tokens, chunk_bytes, packs):
                yield pb.PutBlocksRequest(chunk=chunks[0], more_chunks=chunks[1:], pin_ttl_seconds=pin_ttl_seconds)

        response = await self.stub.PutBlocks(requests(), timeout=timeout)
        self.packs_puts = response.reads_more_chunks
        return PutResult(list(response.stored_hashes), response.num_bytes, response.num_evicted)

    async def get_stored_blocks(
        self, block_hashes: Sequence[int], timeout: float | None = None
    ) -> dict[int, StoredBlock]:
        """The present blocks among ``block_hashes`` with their declared token ids."""
        found: dict[int, StoredBlock] = {}
        parts: list[bytes] = []
        tokens: tuple[int, ...] = ()
        current: int | None = None
        async for response in self.stub.GetBlocks(pb.GetBlocksRequest(block_hashes=block_hashes, packed=True),
                                                 timeout=timeout):
            for chunk in (response.chunk, *response.more_chunks):
                if current is None:
                    current, tokens, parts = chunk.block_hash, tuple(chunk.token_ids), []
                elif chunk.block_hash != current:
                    raise RuntimeError(f"store {self.address} interleaved block {chunk.block_hash} into {current}")
                parts.append(chunk.data)
                if chunk.last:
                    found[current] = StoredBlock(b"".join(parts), tokens)
                    current = None
        if current is not None:
            raise RuntimeError(f"store {self.address} ended its stream inside block {current}")
        return found

    async def get_blocks(self, block_hashes: Sequence[int], timeout: float | None = None) -> dict[int, bytes]:
        """The bytes of the present blocks among ``block_hashes``; absent ones are left out."""
        stored = await self.get_stored_blocks(block_hashes, timeout)
        return {h: block.data for h, block in stored.items()}

    async def contains(self, block_hashes: Sequence[int], timeout: float | None = None) -> list[bool]:
        response = await self.stub.Contains(pb.ContainsRequest(block_hashes=block_hashes), timeout=timeout)
        return list(response.present)

    async def pin(self, block_hashes: Sequence[int], ttl_seconds: float, timeout: float | None = None) -> list[bool]:
        """Pin for ``ttl_seconds`` (0 unpins); one presence flag per hash."""
        request = pb.PinBlocksRequest(block_hashes=block_hashes, ttl_seconds=ttl_seconds)
        return list((await self.stub.PinBlocks(request, timeout=timeout)).present)

    async def stats(self, timeout: float | None = None) -> pb.StatsResponse:
        return await self.stub.Stats(pb.StatsRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "KVStoreClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _weight(instance_id: str, block_hash: int) -> int:
    digest = hashlib.blake2b(struct.pack("<Q", block_hash) + instance_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def choose_store(block_hash: int, instances: Sequence[InstanceRecord]) -> InstanceRecord:
    """The store a block lives on: the instance of highest rendezvous weight."""
    if not instances:
        raise LookupError("no live kvstore instance")
    return max(instances, key=lambda inst: (_weight(inst.instance_id, block_hash), inst.instance_id))


def group_by_store(block_hashes: Iterable[int], instances: Sequence[InstanceRecord]) -> dict[str, list[int]]:
    """Hashes grouped by the instance id :func:`choose_store` picks, order kept."""
    groups: dict[str, list[int]] = {}
    for block_hash in block_hashes:
        groups.setdefault(choose_store(block_hash, instances).instance_id, []).append(block_hash)
    return groups


async def locate(
    redis_client: aioredis.Redis | None, block_hashes: Sequence[int], instances: Sequence[InstanceRecord]
) -> dict[str, list[int]]:
    """Hashes grouped by the live store to read from (:func:`group_for_read`), asking the
    KV index only where it can change the answer: with one store every block is read from
    it whatever the index says, so Redis is not asked (a round trip off the request's
    path). Raises what the index lookup raises."""
    if redis_client is None or len(instances) <= 1:
        return group_by_store(block_hashes, instances)
    return group_for_read(block_hashes, await kvindex.lookup(redis_client, block_hashes), instances)


def group_for_read(
    block_hashes: Sequence[int], owners: Sequence[str | None], instances: Sequence[InstanceRecord]
) -> dict[str, list[int]]:
    """Hashes grouped by the live store to read from: the one the KV index names
    (``owners``, from :func:`cleave.kvstore.index.lookup`) if live, else the rendezvous pick."""
    live = {inst.instance_id for inst in instances}
    groups: dict[str, list[int]] = {}
    for block_hash, owner in zip(block_hashes, owners):
        if owner not in live:
            owner = choose_store(block_hash, instances).instance_id
        groups.setdefault(owner, []).append(block_hash)
    return groups


class KVStorePool:
    """Every live store, found in the registry; each block put on the store rendezvous
    hashing picks and read from the store the index names (else the rendezvous pick)."""

    def __init__(self, redis_client: aioredis.Redis, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.redis = redis_client
        self.registry = AsyncRegistry(redis_client)
        self.chunk_bytes = chunk_bytes
        self.instances: dict[str, InstanceRecord] = {}
        self._clients: dict[str, KVStoreClient] = {}

    async def refresh(self) -> list[InstanceRecord]:
        """Re-read the live stores from the registry."""
        live = await self.registry.list_instances("kvstore")
        self.instances = {inst.instance_id: inst for inst in live}
        for instance_id in list(self._clients):
            client = self._clients[instance_id]
            if instance_id not in self.instances or self.instances[instance_id].address != client.address:
                await self._clients.pop(instance_id).close()
        return live

    def client(self, instance_id: str) -> KVStoreClient:
        if instance_id not in self._clients:
            self._clients[instance_id] = KVStoreClient(self.instances[instance_id].address, self.chunk_bytes)
        return self._clients[instance_id]

    async def put_blocks(self, blocks: Sequence[tuple[int, bytes]], **kwargs) -> dict[str, PutResult]:
        """Put each block on its rendezvous store, one stream per store, concurrently."""
        data = dict(blocks)
        groups = group_by_store(data, list(self.instances.values()))
        results = await asyncio.gather(
            *(self.client(sid).put_blocks([(h, data[h]) for h in hashes], **kwargs) for sid, hashes in groups.items())
        )
        return dict(zip(groups, results))

    async def locate(self, block_hashes: Sequence[int]) -> dict[str, list[int]]:
        """Hashes grouped by the live store to ask: the indexed one, else the rendezvous one."""
        return await locate(self.redis, block_hashes, list(self.instances.values()))

    async def get_blocks(self, block_hashes: Sequence[int]) -> dict[int, bytes]:
        """The present blocks among ``block_hashes``, from whichever stores hold them."""
        groups = await self.locate(block_hashes)
        parts = await asyncio.gather(*(self.client(sid).get_blocks(hashes) for sid, hashes in groups.items()))
        return {h: data for part in parts for h, data in part.items()}

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
