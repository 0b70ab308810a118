"""Physical KV blocks: allocation, reference counts and the prefix cache.

A full block's hash chains its parent's hash with its own token ids, so a hash
names the whole prefix up to and including that block. The same hash is the KV
store's key and the router's index key, so every service agrees on which block is
which. A freed block keeps its hash (and so stays reusable) until it is handed out
again; free blocks are handed out least recently freed first.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

from cleave.engine.sequence import Sequence


def hash_block(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Stable across processes and machines (unlike ``hash()``): 63-bit blake2b."""
    digest = hashlib.blake2b(struct.pack(f"<Q{len(token_ids)}q", parent_hash, *token_ids), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def extend_block_hashes(
    hashes: list[int], token_ids: list[int], block_size: int, root_hash: int, num_blocks: int | None = None
) -> list[int]:
    """Extend ``hashes`` (the chain of the first blocks) to ``num_blocks`` full blocks of
    ``token_ids`` (default: all of them), in place; each block is hashed once."""
    num_blocks = len(token_ids) // block_size if num_blocks is None else num_blocks
    while len(hashes) < num_blocks:
        start = len(hashes) * block_size
        hashes.append(hash_block(hashes[-1] if hashes else root_hash, token_ids[start : start + block_size]))
    return hashes


def hash_prefix_blocks(token_ids: list[int], block_size: int, root_hash: int = 0) -> list[int]:
    """Chained hashes of every full block of ``token_ids``."""
    return extend_block_hashes([], token_ids, block_size, root_hash)


class Block:
    __slots__ = ("block_id", "ref_count", "block_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, root_hash: int = 0) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.root_hash = root_hash
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_cache_queries = 0
        self.num_cache_hits = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix cache -------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of ``seq``. At least one token is
        always left to compute, since the last one's logits are needed."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        for index, block_hash in enumerate(hashes):
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            block_id = self.cached.get(block_hash)
            # A hash hit counts only if the tokens match too: hashes can collide.
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    # -- allocation -----------------------------------------------------------------
    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        revived = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        needed = self.blocks_for(seq.num_tokens) - len(hits)
        return needed + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Give ``seq`` blocks for all its tokens, reusing ``hits`` for its prefix."""
        assert not seq.block_table
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_blocks[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(self.blocks_for(seq.num_tokens) - len(hits)):
            seq.block_table.append(self._take_free_block())
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_committed_blocks = len(hits)
        self.num_cache_queries += seq.num_tokens
        self.num_cache_hits += seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        while len(seq.block_table) < self.blocks_for(seq.num_computed_tokens + num_new_tokens):
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence) -> None:
        """Register in the prefix cache the blocks that became full and computed."""
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._block_hashes(seq, num_full)
        for index in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_table[index]]
            block_hash = hashes[index]
            if self.enable_prefix_caching and block_hash not in self.cached and block.block_hash is None:
                block.block_hash = block_hash
                block.token_ids = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
                self.cached[block_hash] = block.block_id
        seq.num_committed_blocks = num_full

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        return extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, self.root_hash, num_blocks)

    def free(self, seq: Sequence) -> None:
        # Tail first, so that shared prefix blocks are the last to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
        seq.block_table = []
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0

    def _take_free_block(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
            del self.cached[block.block_hash]
        block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    # -- import of blocks computed elsewhere -------------------------------------------
    def take_block_for_import(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """A free block to receive an imported block's KV, registered under its hash and
        left free (reusable, evictable). None if it is already cached or no block is free."""
        if block_hash in self.cached or not self.free_blocks or not self.enable_prefix_caching:
            return None
        block_id = self._take_free_block()
        block = self.blocks[block_id]
        block.ref_count = 0
        block.block_hash, block.token_ids = block_hash, tuple(token_ids)
        self.cached[block_hash] = block_id
        self.free_blocks[block_id] = None
        return block_id
