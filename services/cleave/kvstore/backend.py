"""The storage-tier interface of the KV store, in LMCache's shape: one abstract class,
one file per tier, a miss returns ``None``, optional operations announced by
capability flags. Blocks are opaque bytes keyed by their chained prefix hash."""

from __future__ import annotations

import abc
from dataclasses import dataclass


class StoreFullError(Exception):
    """A block cannot be stored: it is larger than the tier, or everything that could
    make room for it is pinned."""


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One block as a tier holds it. ``token_ids`` are those the writer declared, so
    that a reader can check a hash hit against its own tokens."""

    data: bytes
    token_ids: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True, slots=True)
class BackendStats:
    num_blocks: int
    num_bytes: int
    capacity_bytes: int
    num_pinned: int
    num_evictions: int


class StorageBackend(abc.ABC):
    """One storage tier. Implementations are safe to call from several threads."""

    #: ``pin``/``unpin`` are implemented.
    supports_pin: bool = False
    #: Blocks survive a restart of the process.
    is_persistent: bool = False
    #: The tier's name in metric labels.
    tier: str = "memory"

    @abc.abstractmethod
    def contains(self, block_hash: int) -> bool:
        """Whether the block is stored. Does not count as a use for eviction order."""

    @abc.abstractmethod
    def put(self, block_hash: int, block: StoredBlock) -> list[int]:
        """Store ``block`` under ``block_hash`` (replacing an equal-hash block) and
        return the hashes evicted to make room. Raises :class:`StoreFullError` when
        it cannot fit; nothing is evicted then."""

    @abc.abstractmethod
    def get(self, block_hash: int) -> StoredBlock | None:
        """The block, or None on a miss. A hit counts as a use for eviction order."""

    @abc.abstractmethod
    def remove(self, block_hash: int) -> bool:
        """Drop the block (pinned or not); False if it was not stored."""

    def pin(self, block_hash: int, ttl_seconds: float) -> bool:
        """Keep the block from eviction for ``ttl_seconds`` from now (a later deadline
        than an existing pin's wins); False if it is not stored."""
        raise NotImplementedError(f"{type(self).__name__} does not support pins")

    def unpin(self, block_hash: int) -> bool:
        """Release the block's pin; False if it is not stored."""
        raise NotImplementedError(f"{type(self).__name__} does not support pins")

    @abc.abstractmethod
    def stats(self) -> BackendStats:
        """Occupancy and eviction count."""

    @abc.abstractmethod
    def hashes(self) -> list[int]:
        """Every stored hash, least recently used first."""

    def close(self) -> None:
        """Release the tier's resources; the backend is unusable afterwards."""
