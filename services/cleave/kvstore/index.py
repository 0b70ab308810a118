"""The KV index in Redis: which store holds which block, for routers scoring prefix
overlap and for readers looking a block up without asking every store.

Keys:

``cleave:kvindex:<hash>``
    The instance id of the store holding the block (decimal hash). Removed when that
    store evicts the block, and only by that store: if the block has since been written
    to another store, the other store's entry stays.
``cleave:kvstore:<instance_id>:blocks``
    Set of the hashes one store has indexed, so that a store can withdraw all its
    entries when it drains or restarts (its memory tier does not survive either).

Writes are queued in the order the store's backend changed and written in that order
by :meth:`KVIndex.flush`, one pipeline per flush, so that an eviction can never be
overtaken by the earlier write of the same block.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Sequence

import redis
import redis.asyncio as aioredis

log = logging.getLogger("cleave.kvstore.index")

INDEX_PREFIX = "cleave:kvindex:"
_BATCH = 1000

# Delete each key only while it still names this store.
_DELETE_IF_OWNER = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 0
"""


def index_key(block_hash: int) -> str:
    return f"{INDEX_PREFIX}{block_hash}"


def store_blocks_key(instance_id: str) -> str:
    return f"cleave:kvstore:{instance_id}:blocks"


async def lookup(client: aioredis.Redis, block_hashes: Sequence[int]) -> list[str | None]:
    """The store instance id indexed for each hash (None where none is), in one round trip."""
    if not block_hashes:
        return []
    values = await client.mget([index_key(h) for h in block_hashes])
    return [v.decode() if isinstance(v, bytes) else v for v in values]


class KVIndex:
    """One store's writer of the index."""

    def __init__(self, client: aioredis.Redis, instance_id: str) -> None:
        self.client = client
        self.instance_id = instance_id
        self._delete_if_owner = client.register_script(_DELETE_IF_OWNER)
        self._pending: list[tuple[bool, int]] = []  # (stored?, hash) in backend order
        self._flush_lock = asyncio.Lock()
        self.num_errors = 0

    def note_stored(self, block_hashes: Iterable[int]) -> None:
        self._pending.extend((True, h) for h in block_hashes)

    def note_evicted(self, block_hashes: Iterable[int]) -> None:
        self._pending.extend((False, h) for h in block_hashes)

    async def flush(self) -> bool:
        """Write the queued changes; False (and counted in ``num_errors``) if Redis
        failed them. The index is advisory: a lost write costs a reader a miss, never
        a wrong block, since stores answer only for blocks they hold."""
        async with self._flush_lock:
            ops, self._pending = self._pending, []
            if not ops:
                return True
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for start in range(0, len(ops), _BATCH):
                        await self._queue(pipe, ops[start : start + _BATCH])
                    await pipe.execute()
                return True
            except (redis.RedisError, OSError) as exc:
                self.num_errors += 1
                log.warning("KV index write failed", extra={"num_ops": len(ops), "error": str(exc)})
                return False

    async def _queue(self, pipe, ops: list[tuple[bool, int]]) -> None:
        members_key = store_blocks_key(self.instance_id)
        # Consecutive ops of one kind become one command; kinds stay in order.
        run: list[int] = []
        for i, (stored, block_hash) in enumerate(ops):
            run.append(block_hash)
            if i + 1 < len(ops) and ops[i + 1][0] == stored:
                continue
            if stored:
                pipe.mset({index_key(h): self.instance_id for h in run})
                pipe.sadd(members_key, *run)
            else:
                await self._delete_if_owner(keys=[index_key(h) for h in run], args=[self.instance_id], client=pipe)
                pipe.srem(members_key, *run)
            run = []

    async def clear(self) -> int:
        """Withdraw every entry this store has indexed; returns how many it had."""
        await self.flush()
        async with self._flush_lock:
            members_key = store_blocks_key(self.instance_id)
            hashes = [int(h) for h in await self.client.smembers(members_key)]
            async with self.client.pipeline(transaction=False) as pipe:
                for start in range(0, len(hashes), _BATCH):
                    batch = hashes[start : start + _BATCH]
                    await self._delete_if_owner(keys=[index_key(h) for h in batch], args=[self.instance_id], client=pipe)
                pipe.delete(members_key)
                await pipe.execute()
            return len(hashes)
