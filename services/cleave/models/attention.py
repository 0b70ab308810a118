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
    slot_mapping: torch.Tensor  # [num_tokens] flat slot (block * block_size + offset)
    query_lens: list[int]  # new tokens per sequence, in batch order
    context_lens: list[int]  # tokens in the cache per sequence after this step
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    is_decode_only: bool  # every sequence brings exactly one token

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, H, D]."""
    write_kv(cache, k, v, meta.slot_mapping)
    block_size = cache.shape[2]
    if meta.is_decode_only:
        return _decode_attention(q, cache, meta, block_size)
    out = torch.empty_like(q)
    start = 0
    for index, (query_len, context_len) in enumerate(zip(meta.query_lens, meta.context_lens)):
        num_blocks = (context_len + block_size - 1) // block_size
        blocks = meta.block_tables[index, :num_blocks]
        keys = cache[0, blocks].flatten(0, 1)[:context_len]
        values = cache[1, blocks].flatten(0, 1)[:context_len]
        query = q[start : start + query_len]
        mask = None
        if query_len > 1:
            # Query i sits at position context_len - query_len + i and sees keys up to it.
            positions = torch.arange(context_len - query_len, context_len, device=q.device)
            mask = positions[:, None] >= torch.arange(context_len, device=q.device)[None, :]
        out[start : start + query_len] = F.scaled_dot_product_attention(
            query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask, enable_gqa=True
        ).transpose(0, 1)
        start += query_len
    return out


def _decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, block_size: int) -> torch.Tensor:
    max_context = max(meta.context_lens)
    num_blocks = (max_context + block_size - 1) // block_size
    tables = meta.block_tables[:, :num_blocks]
    keys = cache[0, tables].flatten(1, 2)[:, :max_context]  # [S, L, Hkv, D]
    values = cache[1, tables].flatten(1, 2)[:, :max_context]
    context = torch.tensor(meta.context_lens, device=q.device)
    mask = torch.arange(max_context, device=q.device)[None, :] < context[:, None]  # [S, L]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [S, H, 1, D]
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        enable_gqa=True,
    )
    return out[:, :, 0, :]
