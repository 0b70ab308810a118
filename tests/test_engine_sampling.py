"""Seeded sampling is reproducible alone and inside a busy batch; stop rules hold."""

from __future__ import annotations

import pytest

from cleave.engine import SamplingParams
from cleave.engine.config import EngineConfig
from cleave.engine.llm_engine import LLMEngine
from reference import mixed_prompts


@pytest.fixture(scope="module")
def engine(tiny_models):
    return LLMEngine(EngineConfig(model=str(tiny_models["mixtral"]), block_size=8, num_kv_blocks=256))


SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=32, ignore_eos=True)


def test_seeded_request_same_alone_and_in_busy_batch(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=11, min_len=20, max_len=20)[0]
    alone = engine.generate([prompt], SAMPLED)[0]
    others = mixed_prompts(engine.model_config.vocab_size, 15, seed=12)
    unseeded = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True)
    batch = engine.generate(others[:7] + [prompt] + others[7:], [unseeded] * 7 + [SAMPLED] + [unseeded] * 8)
    assert batch[7] == alone
    assert len(set(alone)) > 3  # really sampled, not a constant


def test_different_seeds_differ(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=13)[0]
    a, b = engine.generate([prompt, prompt], [SAMPLED, SamplingParams(**{**_fields(SAMPLED), "seed": 99})])
    assert a != b


def test_seeded_request_survives_preemption(tiny_models):
    small = LLMEngine(EngineConfig(model=str(tiny_models["mixtral"]), block_size=4, num_kv_blocks=20))
    prompt = mixed_prompts(small.model_config.vocab_size, 1, seed=14, min_len=12, max_len=12)[0]
    alone = small.generate([prompt], SAMPLED)[0]
    crowd = mixed_prompts(small.model_config.vocab_size, 6, seed=15, min_len=10, max_len=20)
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    out = small.generate(crowd + [prompt], [greedy] * 6 + [SAMPLED])
    assert small.stats()["num_preemptions"] > 0
    assert out[-1] == alone


def test_top_k_one_is_greedy(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=16)[0]
    greedy = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    top1 = engine.generate([prompt], SamplingParams(temperature=1.5, top_k=1, seed=3, max_tokens=16, ignore_eos=True))[0]
    assert top1 == greedy


def test_stop_token_ids_and_max_tokens(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=17)[0]
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_at = free[5]
    first = free.index(stop_at)
    engine.add_request("stop", prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at], ignore_eos=True))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    assert [t for o in outputs for t in o.new_token_ids] == free[: first + 1]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].finished
    assert len(free) == 20


def test_logprobs_are_of_chosen_tokens(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=18)[0]
    engine.add_request("lp", prompt, SamplingParams(temperature=0, max_tokens=4, logprobs=True, ignore_eos=True))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    logprobs = [lp for o in outs for lp in o.new_logprobs]
    assert len(logprobs) == 4 and all(lp <= 0 for lp in logprobs)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([10**9], SamplingParams(), "token ids"),
        ([1] * 5000, SamplingParams(), "context"),
        ([1, 2], SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_requests_rejected(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_abort_frees_blocks(engine):
    prompt = mixed_prompts(engine.model_config.vocab_size, 1, seed=19, min_len=40, max_len=40)[0]
    engine.add_request("abort-me", prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.stats()["num_used_kv_blocks"] > 0
    out = engine.abort_request("abort-me")
    assert out.finished and out.finish_reason == "abort"
    assert engine.stats()["num_used_kv_blocks"] == 0 and not engine.has_unfinished()


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in params.__slots__}


@pytest.mark.parametrize("params", [GREEDY_RESUME := SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                                    SAMPLED], ids=["greedy", "seeded"])
def test_resumed_request_continues_exactly(tiny_models, params):
    """What a decode worker or a failover does: continue from tokens generated elsewhere."""
    config = EngineConfig(model=str(tiny_models["qwen2_moe"]), block_size=8, num_kv_blocks=128)
    first, second = LLMEngine(config), LLMEngine(config)
    prompt = mixed_prompts(first.model_config.vocab_size, 1, seed=20, min_len=30, max_len=30)[0]
    full = first.generate([prompt], params)[0]
    for done in (1, 9):
        second.add_request(f"resume-{done}", prompt + full[:done], params, num_output_tokens=done)
        outs = []
        while second.has_unfinished():
            outs.extend(second.step())
        assert [t for o in outs for t in o.new_token_ids] == full[done:]
        assert outs[-1].num_output_tokens == len(full) and outs[-1].finish_reason == "length"


def test_resume_count_validated(engine):
    with pytest.raises(ValueError, match="num_output_tokens"):
        engine.add_request("r", [1, 2, 3], SamplingParams(max_tokens=2), num_output_tokens=2)
