"""The forward pass: turns a scheduled batch into flat tensors, runs the model over
the paged KV cache, and samples. It never decides what runs."""

from __future__ import annotations

import torch

from cleave.engine.sampler import sample
from cleave.engine.scheduler import ScheduledSequence
from cleave.models.attention import AttentionMetadata
from cleave.models.causal_lm import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: str, dtype: torch.dtype) -> None:
        config = model.config
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # One allocation for every layer: [layers, 2 (k, v), blocks, kv heads, block_size, head dim],
        # head-major inside a block (cleave.models.attention says why).
        self.kv_cache = torch.zeros(
            config.num_hidden_layers, 2, num_blocks, config.num_key_value_heads, block_size, config.head_dim,
            dtype=dtype, device=self.device,
        )
        self.kv_caches = list(self.kv_cache.unbind(0))
        self.default_generator = torch.Generator()

    @staticmethod
    def kv_bytes_per_block(model_config, block_size: int, dtype: torch.dtype) -> int:
        c = model_config
        return c.num_hidden_layers * 2 * block_size * c.num_key_value_heads * c.head_dim * dtype.itemsize

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> dict[str, tuple[int, float | None]]:
        """Compute the scheduled tokens; return (token, logprob or None) for each sequence
        whose last token was computed in this step."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for item in batch:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids[start:end])
            for position in range(start, end):
                positions.append(position)
                slots.append(seq.block_table[position // self.block_size] * self.block_size + position % self.block_size)
        meta = AttentionMetadata.build(
            slots,
            [item.num_new_tokens for item in batch],
            [item.seq.num_computed_tokens + item.num_new_tokens for item in batch],
            [item.seq.block_table for item in batch],
            self.block_size,
            self.kv_cache.shape[3],  # kv heads
            self.device,
        )
        hidden = self.model(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_caches,
            meta,
        )
        last_rows, finishing = [], []
        offset = 0
        for item in batch:
            offset += item.num_new_tokens
            if item.completes:
                last_rows.append(offset - 1)
                finishing.append(item.seq)
        if not finishing:
            return {}
        logits = self.model.logits(hidden[torch.tensor(last_rows, device=self.device)])
        tokens, logprobs = sample(
            logits, [s.params for s in finishing], [s.generator for s in finishing], self.default_generator
        )
        return {seq.request_id: (tok, lp) for seq, tok, lp in zip(finishing, tokens, logprobs)}

    # A block leaves and enters the engine token-major, [layers, 2, block_size, kv heads,
    # head dim], whatever the layout inside: the KV store and other workers hold that.
    @property
    def block_shape(self) -> tuple[int, ...]:
        layers, _, _, kv_heads, block_size, head_dim = self.kv_cache.shape
        return (layers, 2, block_size, kv_heads, head_dim)

    def read_block(self, block_id: int) -> torch.Tensor:
        return self.kv_cache[:, :, block_id].transpose(2, 3).contiguous().cpu()

    def write_block(self, block_id: int, data: torch.Tensor) -> None:
        self.kv_cache[:, :, block_id].copy_(data.to(self.kv_cache.device, self.kv_cache.dtype).transpose(2, 3))
