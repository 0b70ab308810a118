"""Greedy output of the engine equals transformers ``generate`` (float32), in every
shape the engine can take: a busy batch, prefix reuse, small chunks, preemption,
KV blocks moved between engines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cleave.engine import SamplingParams
from cleave.engine.config import EngineConfig
from cleave.engine.llm_engine import LLMEngine
from reference import assert_greedy_equal, load_hf, mixed_prompts

FAMILIES = ["llama", "qwen2", "mixtral", "qwen2_moe", "mixtral_hd64"]
MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tiny_models):
    path = tiny_models.get(request.param) or request.getfixturevalue("tiny_mixtral_hd64_dir")
    return path, load_hf(path)


def make_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), **{"block_size": 8, "num_kv_blocks": 512, **overrides}))


def test_batch_of_16_mixed_lengths(tiny):
    path, hf = tiny
    engine = make_engine(path)
    prompts = mixed_prompts(hf.config.vocab_size, 16, seed=1)
    outputs = engine.generate(prompts, GREEDY)
    assert_greedy_equal(hf, prompts, outputs, MAX_NEW)
    assert engine.stats()["num_used_kv_blocks"] == 0


def test_prefix_reuse(tiny):
    path, hf = tiny
    engine = make_engine(path)
    shared = mixed_prompts(hf.config.vocab_size, 4, seed=2, min_len=40, max_len=50)
    engine.generate(shared, GREEDY)
    # Second round: the same prefixes with new tails, plus exact repeats.
    tails = mixed_prompts(hf.config.vocab_size, 16, seed=3, min_len=1, max_len=12)
    prompts = [shared[i % 4] + tails[i] for i in range(12)] + shared
    hits_before = engine.stats()["prefix_cache_hits"]
    outputs = engine.generate(prompts, GREEDY)
    assert engine.stats()["prefix_cache_hits"] - hits_before >= 16 * 8 * 4  # every prompt reused >= 4 blocks
    assert_greedy_equal(hf, prompts, outputs, MAX_NEW)


def test_chunked_prefill_small_budget(tiny):
    path, hf = tiny
    engine = make_engine(path, max_num_batched_tokens=7)
    prompts = mixed_prompts(hf.config.vocab_size, 16, seed=4, min_len=20, max_len=70)
    outputs = engine.generate(prompts, GREEDY)
    assert_greedy_equal(hf, prompts, outputs, MAX_NEW)


def test_preemption_with_tiny_kv_pool(tiny):
    path, hf = tiny
    engine = make_engine(path, num_kv_blocks=24, block_size=4)
    prompts = mixed_prompts(hf.config.vocab_size, 16, seed=5, min_len=10, max_len=40)
    outputs = engine.generate(prompts, GREEDY)
    assert engine.stats()["num_preemptions"] > 0
    assert_greedy_equal(hf, prompts, outputs, MAX_NEW)


def test_kv_blocks_exported_and_imported(tiny):
    path, hf = tiny
    source, target = make_engine(path), make_engine(path)
    prompt = mixed_prompts(hf.config.vocab_size, 1, seed=6, min_len=50, max_len=50)[0]
    expected = source.generate([prompt], GREEDY)[0]
    blocks = source.export_blocks(source.block_hashes(prompt))
    assert len(blocks) == 50 // 8
    from cleave.engine.kv_transfer import KVBlock

    wire = [KVBlock.from_bytes(block.to_bytes()) for block in blocks]
    assert target.import_blocks(wire) == len(blocks)
    assert target.generate([prompt], GREEDY)[0] == expected
    assert target.stats()["prefix_cache_hits"] == len(blocks) * 8


def test_smollm2_batch_of_16(smollm2_dir):
    hf = load_hf(smollm2_dir)
    engine = make_engine(smollm2_dir, num_kv_blocks=256, block_size=16)
    prompts = mixed_prompts(hf.config.vocab_size, 16, seed=7, min_len=4, max_len=48)
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert_greedy_equal(hf, prompts, outputs, 16)


def test_smollm2_prefix_chunked_preempted(smollm2_dir):
    hf = load_hf(smollm2_dir)
    engine = make_engine(smollm2_dir, num_kv_blocks=20, block_size=8, max_num_batched_tokens=24)
    base = mixed_prompts(hf.config.vocab_size, 2, seed=8, min_len=30, max_len=30)
    tails = mixed_prompts(hf.config.vocab_size, 8, seed=9, min_len=2, max_len=10)
    prompts = [base[i % 2] + tails[i] for i in range(8)]
    engine.generate(base, SamplingParams(temperature=0, max_tokens=1))
    outputs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert_greedy_equal(hf, prompts, outputs, 12)


def test_async_engine_hands_a_lagging_consumer_what_piled_up_in_one_output(tiny):
    """A consumer slower than the steps gets the tokens it missed in one output (one SSE
    chunk, one gRPC message), nothing lost and nothing reordered."""
    import asyncio
    import time

    from cleave.engine.async_engine import AsyncLLMEngine

    path, hf = tiny
    prompt = mixed_prompts(hf.config.vocab_size, 1, seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=True)
    engine = AsyncLLMEngine(engine=make_engine(path))

    async def lagging():
        stream = engine.generate("lagging", prompt, params)
        first = await anext(stream)
        deadline = time.monotonic() + 60
        while engine.engine.has_unfinished():  # every other step's output is queued, unread
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        return first, [out async for out in stream]

    engine.start()
    try:
        first, rest = asyncio.run(lagging())
    finally:
        engine.shutdown()
    assert not first.finished and len(first.new_logprobs) == len(first.new_token_ids)
    assert len(rest) == 1 and rest[0].finished and rest[0].finish_reason == "length"
    assert rest[0].num_output_tokens == MAX_NEW
    assert len(rest[0].new_token_ids) == len(rest[0].new_logprobs) == MAX_NEW - len(first.new_token_ids)
    assert_greedy_equal(hf, [prompt], [first.new_token_ids + rest[0].new_token_ids], MAX_NEW)


def test_loading_a_model_leaves_torch_dynamo_unimported(tiny_models, tiny_mixtral_hd64_dir):
    """Every worker process loads its model at start: building the skeleton on the meta
    device must not compute there (meta arithmetic and init go through torch._refs, whose
    first use imports torch._dynamo, over a second of each start)."""
    paths = [*tiny_models.values(), tiny_mixtral_hd64_dir]
    script = (
        "import sys\n"
        "from cleave.models.loader import load_model\n"
        "for path in sys.argv[1:]:\n"
        "    load_model(path)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *map(str, paths)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
