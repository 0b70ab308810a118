"""How blocks travel in the KV store's streams (``PutBlocks`` and ``GetBlocks`` alike):
cut into chunks of at most ``chunk_bytes``, and packed, for a side that reads them so,
up to ``chunk_bytes`` of chunks a message (``chunk`` then ``more_chunks``)."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

from cleave.protogen.cleave.v1 import kvstore_pb2 as pb


def chunk_messages(
    blocks: Iterable[tuple[int, bytes, Sequence[int]]], chunk_bytes: int, packed: bool
) -> Iterator[tuple[list[pb.KVBlockChunk], int]]:
    """The chunks of each message of a stream of ``(hash, data, token_ids)`` blocks, with
    their data bytes, in stream order; a block's token ids travel on its first chunk.
    Unpacked, each chunk is a message of its own."""
    pending: list[pb.KVBlockChunk] = []
    pending_bytes = 0
    for block_hash, data, token_ids in blocks:
        for offset in range(0, len(data), chunk_bytes):
            # A block of one chunk is sent as it is: bytes() of whole bytes copies nothing.
            piece = bytes(data[offset : offset + chunk_bytes])
            if pending and (pending_bytes + len(piece) > chunk_bytes or not packed):
                yield pending, pending_bytes
                pending, pending_bytes = [], 0
            pending.append(pb.KVBlockChunk(
                block_hash=block_hash,
                token_ids=token_ids if offset == 0 else (),
                data=piece,
                last=offset + chunk_bytes >= len(data),
            ))
            pending_bytes += len(piece)
    if pending:
        yield pending, pending_bytes
