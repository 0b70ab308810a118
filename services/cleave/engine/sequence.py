"""Per-request state inside the engine."""

from __future__ import annotations

import enum

import torch

from cleave.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self, request_id: str, token_ids: list[int], params: SamplingParams, num_output_tokens: int = 0
    ) -> None:
        """``num_output_tokens``: how many of ``token_ids`` (at the end) were generated
        already, elsewhere or before a failover; they count towards ``max_tokens``."""
        self.request_id = request_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids) - num_output_tokens
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.is_admitted = False
        self.block_table: list[int] = []
        # Chained hashes of the full blocks of token_ids, extended as blocks fill. Tokens
        # are only ever appended, so they stay valid across preemption.
        self.block_hashes: list[int] = []
        self.num_committed_blocks = 0  # full blocks registered in the prefix cache
        self.finish_reason: str | None = None
        # A per-request generator makes a seeded request sample the same tokens
        # whatever else shares its batch, and across preemption.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
            # One uniform draw per sampled token: skipping those already drawn elsewhere
            # continues the same random stream, so a resumed request samples as if unbroken.
            if not params.is_greedy and num_output_tokens:
                torch.rand(num_output_tokens, generator=self.generator)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
