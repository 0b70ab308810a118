"""Attention over a paged KV cache.

The cache of one layer is ``[2, num_blocks, num_kv_heads, block_size, head_dim]``:
head-major inside a block, so that one gather of whole (block, head) rows hands
attention each head's context as a contiguous ``[context, head_dim]`` matrix, with no
transpose copy after it. (The KV blocks that leave the engine keep the token-major
``[block_size, num_kv_heads, head_dim]`` order: ``cleave.engine.model_runner``.)

A batch is a flat list of tokens from several sequences; each sequence brings
``query_len`` new tokens whose keys and values are written to their slots before
attention reads the context back through the block table. Sequences with a single
query token (decodes) attend together in two batched matrix products; the others
(prompt chunks) one by one, each with its causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PromptChunk:
    """A sequence bringing more than one token: where its queries sit in the batch, how
    many, its context length after this step, and its causal mask [query_len, context_len]."""

    start: int
    query_len: int
    context_len: int
    mask: torch.Tensor


@dataclass(slots=True)
class AttentionMetadata:
    """What every layer needs to attend, built once per step by :meth:`build`."""

    num_seqs: int
    # Rows of the cache viewed as [2, blocks * kv heads * block_size, head_dim] that the
    # new tokens' keys and values go to, [num_tokens * num_kv_heads] (token-major).
    write_rows: torch.Tensor
    # Single-token sequences ("decodes"): their token rows in the batch (None when every
    # sequence decodes, the common step), and their (block, kv head) rows of the cache
    # viewed as [2, blocks * kv heads, block_size * head_dim], [decodes * kv heads *
    # longest table], each table padded with block 0, whose positions the bias hides.
    decode_rows: torch.Tensor | None
    decode_blocks: torch.Tensor | None
    decode_bias: torch.Tensor | None  # [decodes, 1, 1, padded context]: 0 visible, -inf not
    # The other sequences, and their contexts' (block, kv head) rows back to back.
    prompts: list[PromptChunk]
    prompt_blocks: torch.Tensor | None
    num_decodes: int

    @property
    def is_decode_only(self) -> bool:
        return self.num_decodes == self.num_seqs

    @classmethod
    def build(
        cls, slot_mapping: list[int], query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
        block_size: int, num_kv_heads: int, device: torch.device,
    ) -> "AttentionMetadata":
        heads = torch.arange(num_kv_heads, device=device)
        slots = torch.tensor(slot_mapping, dtype=torch.long, device=device)
        write_rows = ((slots // block_size * num_kv_heads)[:, None] + heads) * block_size + (slots % block_size)[:, None]
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        starts, row = [], 0
        for n in query_lens:
            starts.append(row)
            row += n
        decode_rows = decode_blocks = decode_bias = None
        if decodes:
            if len(decodes) < len(query_lens):
                decode_rows = torch.tensor([starts[i] for i in decodes], dtype=torch.long, device=device)
            num_blocks = max((context_lens[i] + block_size - 1) // block_size for i in decodes)
            # One flat list is far cheaper for torch.tensor than a list of lists.
            flat: list[int] = []
            for i in decodes:
                table = block_tables[i][:num_blocks]
                flat.extend(table)
                flat.extend([0] * (num_blocks - len(table)))
            tables = torch.tensor(flat, dtype=torch.long, device=device).view(len(decodes), 1, num_blocks)
            decode_blocks = (tables * num_kv_heads + heads[:, None]).flatten()
            lengths = torch.tensor([context_lens[i] for i in decodes], device=device)
            padding = torch.arange(num_blocks * block_size, device=device)[None, :] >= lengths[:, None]
            decode_bias = torch.zeros(padding.shape, device=device).masked_fill_(padding, float("-inf"))[:, None, None]
        prompts: list[PromptChunk] = []
        prompt_rows: list[int] = []
        for i, (query_len, context_len) in enumerate(zip(query_lens, context_lens)):
            if query_len == 1:
                continue
            table = block_tables[i][: (context_len + block_size - 1) // block_size]
            # Head by head, each head's blocks in order: the gather lays out [kv heads, context, D].
            for head in range(num_kv_heads):
                prompt_rows.extend(block * num_kv_heads + head for block in table)
            # Query i sits at position context_len - query_len + i and sees keys up to it.
            mask = (torch.arange(context_len - query_len, context_len, device=device)[:, None]
                    >= torch.arange(context_len, device=device)[None, :])
            prompts.append(PromptChunk(starts[i], query_len, context_len, mask))
        return cls(
            num_seqs=len(query_lens),
            write_rows=write_rows.flatten(),
            decode_rows=decode_rows,
            decode_blocks=decode_blocks,
            decode_bias=decode_bias,
            prompts=prompts,
            prompt_blocks=torch.tensor(prompt_rows, dtype=torch.long, device=device) if prompts else None,
            num_decodes=len(decodes),
        )


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_rows: torch.Tensor) -> None:
    flat = cache.view(2, -1, cache.shape[-1])
    flat[0].index_copy_(0, write_rows, k.reshape(-1, k.shape[-1]))
    flat[1].index_copy_(0, write_rows, v.reshape(-1, v.shape[-1]))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, Hkv, D] for the new tokens. Returns [T, H, D]."""
    write_kv(cache, k, v, meta.write_rows)
    if meta.is_decode_only:
        return _decode_attention(q, cache, meta)
    out = torch.empty_like(q)
    if meta.num_decodes:
        out.index_copy_(0, meta.decode_rows, _decode_attention(q.index_select(0, meta.decode_rows), cache, meta))
    num_kv_heads, block_size, head_dim = cache.shape[-3:]
    # Every prompt's context in one gather: [2, (sequence, kv head, block), block_size, D].
    kv = cache.view(2, -1, block_size, head_dim).index_select(1, meta.prompt_blocks)
    block_start = 0
    for chunk in meta.prompts:
        num_blocks = (chunk.context_len + block_size - 1) // block_size
        # This sequence's [kv heads, context, D], trimmed to its length: a view, no copy.
        own = kv[:, block_start : block_start + num_kv_heads * num_blocks]
        own = own.reshape(2, num_kv_heads, num_blocks * block_size, head_dim)[:, :, : chunk.context_len]
        rows = slice(chunk.start, chunk.start + chunk.query_len)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1), own[0], own[1], attn_mask=chunk.mask, enable_gqa=True,
        ).transpose(0, 1)
        block_start += num_kv_heads * num_blocks
    return out


def _decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One query token per sequence, [S, H, D]: every (sequence, kv head) context comes
    out of one gather as a contiguous [padded context, D] matrix, and the heads of a
    group share it in one batched product, so no key or value is copied twice."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = cache.shape[-3], cache.shape[-2]
    kv = cache.view(2, -1, block_size * head_dim).index_select(1, meta.decode_blocks)
    kv = kv.view(2, num_seqs * num_kv_heads, -1, head_dim)  # [2, S * Hkv, padded context, D]
    group = num_heads // num_kv_heads  # query heads per kv head: SDPA's enable_gqa order
    scores = torch.bmm(q.reshape(num_seqs * num_kv_heads, group, head_dim), kv[0].transpose(1, 2))
    scores = scores.view(num_seqs, num_kv_heads, group, -1).mul_(head_dim**-0.5).add_(meta.decode_bias)
    probs = torch.softmax(scores, dim=-1).view(num_seqs * num_kv_heads, group, -1)
    return torch.bmm(probs, kv[1]).view(num_seqs, num_heads, head_dim)
