"""Continuous batching with chunked prefill under a per-step token budget, and
preemption by recompute when KV blocks run out. Policy lives here; the block
manager only counts blocks."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cleave.engine.block_manager import BlockManager
from cleave.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """After this step every token of the sequence is computed, so it samples one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
        max_prefill_tokens_with_decode: int = 0,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_prefill_tokens_with_decode = max_prefill_tokens_with_decode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        # Decodes come out of the budget first, so a long prompt chunk never starves them,
        # and while any sequence decodes, prompt work in the same step is capped: each of
        # those prompt tokens delays every running sequence's next token.
        num_decodes = sum(1 for seq in self.running if seq.num_uncomputed_tokens == 1)
        prefill_budget = budget - num_decodes
        if num_decodes and self.max_prefill_tokens_with_decode:
            prefill_budget = min(prefill_budget, self.max_prefill_tokens_with_decode)
        scheduled: list[ScheduledSequence] = []
        preempted = False
        # Running sequences first (decodes and unfinished chunked prefills), oldest first.
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            is_decode = seq.num_uncomputed_tokens == 1
            num_new = 1 if is_decode else min(seq.num_uncomputed_tokens, budget, max(prefill_budget, 0))
            if num_new == 0:
                index += 1
                continue
            while not self.block_manager.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.block_manager.append(seq, num_new)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            if not is_decode:
                prefill_budget -= num_new
            index += 1
        # Then admit waiting sequences, unless this step already had to preempt.
        while (not preempted and self.waiting and min(budget, prefill_budget) > 0
               and len(self.running) < self.max_num_seqs):
            seq = self.waiting[0]
            hits = self.block_manager.cached_prefix(seq)
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, hits)
            if not seq.is_admitted:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.is_admitted = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget, prefill_budget)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
            prefill_budget -= num_new
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
