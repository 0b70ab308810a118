"""The memory tier: blocks in this process's RAM, up to a byte capacity, evicted least
recently used first, skipping blocks whose time-to-live pin has not lapsed."""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from typing import Callable

from cleave.kvstore.backend import BackendStats, StorageBackend, StoreFullError, StoredBlock


class MemoryBackend(StorageBackend):
    supports_pin = True
    is_persistent = False

    def __init__(self, capacity_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be > 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.clock = clock
        self._blocks: OrderedDict[int, StoredBlock] = OrderedDict()  # least recently used first
        self._pins: dict[int, float] = {}  # block hash -> deadline on `clock`
        # (deadline, block hash) of every pin set, so that lapsed pins leave ``_pins`` in
        # deadline order: stats() runs on every put (the registry's load), and counting the
        # live pins by a scan cost a put time in proportion to the blocks pinned. Entries
        # whose pin was since extended, cut or dropped are skipped when they come up.
        self._pin_deadlines: list[tuple[float, int]] = []
        self._num_bytes = 0
        self._num_evictions = 0
        self._lock = threading.Lock()

    def contains(self, block_hash: int) -> bool:
        with self._lock:
            return block_hash in self._blocks

    def put(self, block_hash: int, block: StoredBlock) -> list[int]:
        with self._lock:
            old = self._blocks.get(block_hash)
            needed = block.nbytes - (old.nbytes if old is not None else 0)
            victims = self._victims(needed, exclude=block_hash)
            for victim in victims:
                self._drop(victim)
            self._num_evictions += len(victims)
            if old is not None:
                self._num_bytes -= old.nbytes
            self._blocks[block_hash] = block
            self._blocks.move_to_end(block_hash)
            self._num_bytes += block.nbytes
            return victims

    def get(self, block_hash: int) -> StoredBlock | None:
        with self._lock:
            block = self._blocks.get(block_hash)
            if block is not None:
                self._blocks.move_to_end(block_hash)
            return block

    def remove(self, block_hash: int) -> bool:
        with self._lock:
            if block_hash not in self._blocks:
                return False
            self._drop(block_hash)
            return True

    def pin(self, block_hash: int, ttl_seconds: float) -> bool:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        with self._lock:
            if block_hash not in self._blocks:
                return False
            deadline = self.clock() + ttl_seconds
            if deadline > self._pins.get(block_hash, float("-inf")):
                self._pins[block_hash] = deadline
                heapq.heappush(self._pin_deadlines, (deadline, block_hash))
                if len(self._pin_deadlines) > 2 * len(self._pins) + 1024:
                    # Pins extended or dropped long before they lapse: start afresh.
                    self._pin_deadlines = [(d, h) for h, d in self._pins.items()]
                    heapq.heapify(self._pin_deadlines)
            return True

    def unpin(self, block_hash: int) -> bool:
        with self._lock:
            self._pins.pop(block_hash, None)
            return block_hash in self._blocks

    def is_pinned(self, block_hash: int) -> bool:
        with self._lock:
            return self._pinned(block_hash, self.clock())

    def stats(self) -> BackendStats:
        with self._lock:
            self._expire_pins(self.clock())
            return BackendStats(
                num_blocks=len(self._blocks),
                num_bytes=self._num_bytes,
                capacity_bytes=self.capacity_bytes,
                num_pinned=len(self._pins),
                num_evictions=self._num_evictions,
            )

    def hashes(self) -> list[int]:
        with self._lock:
            return list(self._blocks)

    def close(self) -> None:
        with self._lock:
            self._blocks.clear()
            self._pins.clear()
            self._pin_deadlines.clear()
            self._num_bytes = 0

    # -- internals (lock held) ------------------------------------------------------------
    def _pinned(self, block_hash: int, now: float) -> bool:
        deadline = self._pins.get(block_hash)
        if deadline is None:
            return False
        if deadline <= now:
            del self._pins[block_hash]
            return False
        return True

    def _expire_pins(self, now: float) -> None:
        heap = self._pin_deadlines
        while heap and heap[0][0] <= now:
            deadline, block_hash = heapq.heappop(heap)
            if self._pins.get(block_hash) == deadline:
                del self._pins[block_hash]

    def _victims(self, needed: int, exclude: int) -> list[int]:
        if needed > self.capacity_bytes:
            raise StoreFullError(f"a block of {needed} bytes exceeds the capacity of {self.capacity_bytes}")
        free = self.capacity_bytes - self._num_bytes
        if needed <= free:
            return []
        now = self.clock()
        victims: list[int] = []
        for block_hash, block in self._blocks.items():
            if block_hash == exclude or self._pinned(block_hash, now):
                continue
            victims.append(block_hash)
            free += block.nbytes
            if needed <= free:
                return victims
        raise StoreFullError(f"no room for {needed} more bytes: the rest of the {self.capacity_bytes}-byte tier is pinned")

    def _drop(self, block_hash: int) -> None:
        block = self._blocks.pop(block_hash)
        self._pins.pop(block_hash, None)
        self._num_bytes -= block.nbytes
