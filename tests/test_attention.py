"""Paged attention against plain causal attention over each sequence's whole context:
decode-only steps, prompt-only steps and mixed steps, with grouped-query and plain
multi-head attention, block tables out of order and contexts that end mid-block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cleave.models.attention import AttentionMetadata, paged_attention

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def reference(q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, query_len: int) -> torch.Tensor:
    """The last ``query_len`` queries of one sequence attending causally to its whole context."""
    context_len = k_all.shape[0]
    mask = torch.arange(context_len - query_len, context_len)[:, None] >= torch.arange(context_len)[None, :]
    out = F.scaled_dot_product_attention(
        q_all[-query_len:].transpose(0, 1), k_all.transpose(0, 1), v_all.transpose(0, 1),
        attn_mask=mask, enable_gqa=True,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("query_lens, context_lens", [
    ([1, 1, 1], [5, 9, 1]),  # decode-only, one context a single token
    ([6, 3], [6, 11]),  # prompt chunks only, the second after 8 cached tokens
    ([1, 7, 1, 2], [13, 7, 3, 10]),  # decodes mixed with prompt chunks
])
def test_paged_attention_matches_dense_attention(num_heads, num_kv_heads, query_lens, context_lens):
    generator = torch.Generator().manual_seed(len(query_lens) * 100 + num_heads)
    head_dim = 8
    cache = torch.zeros(2, NUM_BLOCKS, num_kv_heads, BLOCK_SIZE, head_dim)
    # Each sequence's blocks scattered over the pool, not in order.
    free = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    tables = [[free.pop() for _ in range((n + BLOCK_SIZE - 1) // BLOCK_SIZE)] for n in context_lens]
    contexts = [
        (torch.randn(n, num_heads, head_dim, generator=generator),
         torch.randn(n, num_kv_heads, head_dim, generator=generator),
         torch.randn(n, num_kv_heads, head_dim, generator=generator))
        for n in context_lens
    ]
    # The tokens before this step's are in the cache already, written as earlier steps would.
    for (q_all, k_all, v_all), table, query_len, context_len in zip(contexts, tables, query_lens, context_lens):
        earlier = context_len - query_len
        if earlier:
            slots = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(earlier)]
            meta = AttentionMetadata.build(slots, [earlier], [earlier], [table], BLOCK_SIZE, num_kv_heads,
                                           torch.device("cpu"))
            paged_attention(q_all[:earlier], k_all[:earlier], v_all[:earlier], cache, meta)
    slots = [
        table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
        for table, query_len, context_len in zip(tables, query_lens, context_lens)
        for p in range(context_len - query_len, context_len)
    ]
    meta = AttentionMetadata.build(slots, query_lens, context_lens, tables, BLOCK_SIZE, num_kv_heads,
                                   torch.device("cpu"))
    q = torch.cat([c[0][-n:] for c, n in zip(contexts, query_lens)])
    k = torch.cat([c[1][-n:] for c, n in zip(contexts, query_lens)])
    v = torch.cat([c[2][-n:] for c, n in zip(contexts, query_lens)])
    out = paged_attention(q, k, v, cache, meta)
    expected = torch.cat([reference(*c, n) for c, n in zip(contexts, query_lens)])
    assert out.shape == (sum(query_lens), num_heads, head_dim)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
