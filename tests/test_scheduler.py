"""Scheduler policy without a model: how much prompt work rides with decodes."""

from __future__ import annotations

import pytest

from cleave.engine.block_manager import BlockManager
from cleave.engine.config import EngineConfig
from cleave.engine.sampling_params import SamplingParams
from cleave.engine.scheduler import Scheduler
from cleave.engine.sequence import Sequence


def sequence(name: str, prompt_len: int) -> Sequence:
    return Sequence(name, list(range(1, prompt_len + 1)), SamplingParams(temperature=0, max_tokens=64))


def step(scheduler: Scheduler) -> dict[str, int]:
    """One step as the engine takes it, sampling token 0 for every completed sequence."""
    batch = scheduler.schedule()
    for item in batch:
        completes = item.completes
        item.seq.num_computed_tokens += item.num_new_tokens
        if completes:
            item.seq.token_ids.append(0)
    return {item.seq.request_id: item.num_new_tokens for item in batch}


def scheduler(budget: int, cap: int) -> Scheduler:
    return Scheduler(BlockManager(256, 4, enable_prefix_caching=False), 16, budget, cap)


def test_prompt_work_beside_decodes_is_capped_and_no_decode_waits():
    s = scheduler(budget=64, cap=8)
    s.add(sequence("a", 5))
    assert step(s) == {"a": 5}  # nothing decodes yet: the whole budget is for prompts
    b, c = sequence("b", 40), sequence("c", 40)
    s.add(b)
    s.add(c)
    steps = 0
    while b.num_output_tokens == 0 or c.num_output_tokens == 0:
        prompts = [q.request_id for q in (b, c) if q.num_output_tokens == 0]
        scheduled = step(s)
        steps += 1
        assert scheduled["a"] == 1
        assert sum(scheduled.get(name, 0) for name in prompts) <= 8
    assert steps == 10  # 80 prompt tokens, 8 a step
    assert step(s) == {"a": 1, "b": 1, "c": 1}


def test_zero_cap_leaves_the_whole_budget_to_prompts():
    s = scheduler(budget=64, cap=0)
    s.add(sequence("a", 5))
    step(s)
    s.add(sequence("b", 40))
    s.add(sequence("c", 40))
    assert step(s) == {"a": 1, "b": 40, "c": 23}


def test_cap_is_validated():
    with pytest.raises(ValueError, match="max_prefill_tokens_with_decode"):
        EngineConfig(model="m", max_prefill_tokens_with_decode=-1)
