"""Attention over a paged KV cache.

The cache of one layer is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``.
A batch is a flat list of tokens from several sequences; each sequence brings
``query_len`` new tokens whose keys and values are written to ``slot_mapping``
before attention reads the whole context back through the block table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer needs to attend, built once per step by :meth:`build`."""

    slot_mapping: torch.Tensor  # [num_tokens] flat slot (block * block_size + offset)
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens in the cache per sequence after this step
    # Flat slots of every sequence's context, in batch order, so that each layer reads
    # its keys and values back with one gather. Decode-only steps: [num_seqs * max_context],
    # each sequence padded to the longest context (padding reads slot 0, masked out);
    # other steps: the sequences' contexts back to back, [sum(context_lens)].
    context_slots: torch.Tensor
    is_decode_only: bool  # every sequence brings exactly one token
    # Decode-only steps: which cached positions each sequence sees, [num_seqs, max_context].
    decode_mask: torch.Tensor | None = None
    # Other steps: per sequence, its causal mask (None for a single query token).
    prefill_masks: list[torch.Tensor | None] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @classmethod
    def build(
        cls, slot_mapping: list[int], query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
        block_size: int, device: torch.device,
    ) -> "AttentionMetadata":
        max_context = max(context_lens)
        max_blocks = (max_context + block_size - 1) // block_size
        tables = torch.tensor(
            [table[:max_blocks] + [0] * (max_blocks - len(table[:max_blocks])) for table in block_tables],
            dtype=torch.long, device=device,
        )
        # Slot of every position up to the longest context, per sequence: [num_seqs, max_context].
        slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).flatten(1)[:, :max_context]
        visible = torch.arange(max_context, device=device)[None, :] < torch.tensor(context_lens, device=device)[:, None]
        is_decode_only = all(n == 1 for n in query_lens)
        meta = cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            query_lens=query_lens,
            context_lens=context_lens,
            context_slots=slots.flatten() if is_decode_only else slots[visible],
            is_decode_only=is_decode_only,
        )
        if is_decode_only:
            meta.decode_mask = visible
        else:
            meta.prefill_masks = [
                # Query i sits at position context_len - query_len + i and sees keys up to it.
                torch.arange(context_len - query_len, context_len, device=device)[:, None]
                >= torch.arange(context_len, device=device)[None, :]
                if query_len > 1 else None
                for query_len, context_len in zip(query_lens, context_lens)
            ]
        return meta


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, H, D]."""
    write_kv(cache, k, v, meta.slot_mapping)
    # Keys and values of every context in one gather: [2, context slots, Hkv, D].
    kv = cache.view(2, -1, cache.shape[-2], cache.shape[-1]).index_select(1, meta.context_slots)
    if meta.is_decode_only:
        return _decode_attention(q, kv, meta)
    out = torch.empty_like(q)
    start = context_start = 0
    for index, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        keys = kv[0, context_start : context_start + context_len]
        values = kv[1, context_start : context_start + context_len]
        out[start : start + query_len] = F.scaled_dot_product_attention(
            q[start : start + query_len].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            attn_mask=meta.prefill_masks[index], enable_gqa=True,
        ).transpose(0, 1)
        start += query_len
        context_start += context_len
    return out


def _decode_attention(q: torch.Tensor, kv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    num_seqs, max_context = meta.decode_mask.shape
    kv = kv.view(2, num_seqs, max_context, kv.shape[-2], kv.shape[-1])  # [2, S, L, Hkv, D]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [S, H, 1, D]
        kv[0].transpose(1, 2),
        kv[1].transpose(1, 2),
        attn_mask=meta.decode_mask[:, None, None, :],
        enable_gqa=True,
    )
    return out[:, :, 0, :]
