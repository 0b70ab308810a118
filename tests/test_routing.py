"""The routing pipelines: filters, scorers and pickers on hand-made candidates."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest

from cleave.common.registry import InstanceRecord
from cleave.engine.block_manager import hash_prefix_blocks
from cleave.router.plugins import Candidate, RoutingContext, parse_pipeline

BLOCK = 4
ROOT = 7


def candidate(instance_id: str, in_flight: int = 0, tokens: int = 0, root: int = ROOT, **load) -> Candidate:
    record = InstanceRecord("prefill", instance_id, f"127.0.0.1:{abs(hash(instance_id)) % 1000 + 1000}",
                            capabilities={"root_hash": str(root), "block_size": BLOCK}, load=load)
    return Candidate(record, in_flight, tokens)


def choose(pipeline, ctx, candidates) -> str:
    chosen = asyncio.run(pipeline.choose(ctx, candidates))
    return chosen.instance_id if chosen else None


def ctx(tokens, **kw) -> RoutingContext:
    return RoutingContext("prefill", "r", tokens, **kw)


def test_round_robin_rotates_over_the_pool():
    pipeline = parse_pipeline("round-robin")
    pool = [candidate("a"), candidate("b"), candidate("c")]
    picks = [choose(pipeline, ctx([1, 2]), pool) for _ in range(6)]
    assert sorted(picks[:3]) == ["a", "b", "c"] and picks[3:] == picks[:3]


def test_least_loaded_takes_the_emptiest_counting_the_routers_own_requests():
    pipeline = parse_pipeline("least-loaded")
    assert choose(pipeline, ctx([1]), [candidate("a", num_running=3), candidate("b", num_running=1)]) == "b"
    # The report lags: b reports idle but this router has just sent it 5 requests.
    assert choose(pipeline, ctx([1]), [candidate("a", num_running=3), candidate("b", in_flight=5)]) == "a"


def test_least_loaded_ties_are_shared():
    pipeline = parse_pipeline("least-loaded")
    pool = [candidate("a"), candidate("b")]
    assert {choose(pipeline, ctx([1]), pool) for _ in range(4)} == {"a", "b"}


def test_kv_aware_follows_the_prefix_then_yields_to_queued_work():
    pipeline = parse_pipeline("kv-aware")
    shared = list(range(100, 132))  # 8 full blocks
    a, b = candidate("a"), candidate("b")
    first = choose(pipeline, ctx(shared + [1, 2]), [a, b])
    other = "b" if first == "a" else "a"
    # The same prefix goes back where its blocks are.
    for tail in ([3, 4], [5, 6, 7], [8]):
        assert choose(pipeline, ctx(shared + tail), [candidate("a"), candidate("b")]) == first
    # Unless that worker has much more prompt work queued than the prefix saves.
    busy = {first: 1000, other: 0}
    pool = [candidate("a", num_queued_prompt_tokens=busy["a"]), candidate("b", num_queued_prompt_tokens=busy["b"])]
    assert choose(pipeline, ctx(shared + [9]), pool) == other


def test_kv_aware_counts_blocks_in_the_store_as_cheaper_than_computing():
    pipeline = parse_pipeline("kv-aware")
    prompt = list(range(40))
    hashes = hash_prefix_blocks(prompt, BLOCK, ROOT)
    asked = []

    async def lookup(block_hashes):
        asked.append(list(block_hashes))
        return ["store-0"] * len(block_hashes)

    # Both workers can fetch all blocks; the one with less queued work wins even though
    # the stored prefix would otherwise make the cost equal.
    pool = [candidate("a", num_queued_prompt_tokens=20), candidate("b", num_queued_prompt_tokens=10)]
    assert choose(pipeline, ctx(prompt, lookup_stored=lookup), pool) == "b"
    assert asked == [hashes]  # one index lookup per decision, for the worker's own hashes


def test_filters_drop_failed_workers_and_other_block_hashes():
    pipeline = parse_pipeline("least-loaded")
    pool = [candidate("a"), candidate("b", num_running=9), candidate("c", root=8)]
    assert choose(pipeline, ctx([1], exclude=frozenset({"a"}), root_hash=str(ROOT)), pool) == "b"
    assert choose(pipeline, ctx([1], exclude=frozenset({"a", "b"}), root_hash=str(ROOT)), pool) is None


def test_weights_combine_scorers():
    # a holds the prefix (kv-aware prefers it) but runs more requests (least-loaded prefers b).
    prompt = list(range(64))
    for spec, expected in (("kv-aware=10,least-loaded", "a"), ("kv-aware,least-loaded=10", "b")):
        pipeline = parse_pipeline(spec)
        pipeline.scorers[0][0].tracker.add("a", hash_prefix_blocks(prompt, BLOCK, ROOT))
        pool = [candidate("a", num_running=4), candidate("b", num_running=1)]
        assert choose(pipeline, ctx(prompt + [1]), pool) == expected, spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "at least one"),
        ("fastest", "unknown routing scorer 'fastest'"),
        ("round-robin,least-loaded", "round-robin takes no scorers"),
        ("kv-aware=0", "must be > 0"),
        ("kv-aware=x", "must be a number"),
    ],
)
def test_bad_pipeline_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_pipeline(spec)


def test_describe_names_the_plugins():
    assert parse_pipeline("kv-aware=2,least-loaded").describe() == {
        "filters": ["exclude-failed", "same-block-hashes"],
        "scorers": {"kv-aware": 2.0, "least-loaded": 1.0},
        "picker": "best",
    }


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cleave.cli", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["router", "--prefill-routing", "fastest"], "prefill_routing: unknown routing scorer 'fastest'"),
        (["router", "--decode-routing", "round-robin,kv-aware"], "decode_routing: round-robin takes no scorers"),
        (["router", "--redis-url", ""], "redis_url is required"),
        (["router", "--max-attempts", "0"], "max_attempts must be >= 1"),
        (["router", "--grpc-port", "70000"], "grpc_port must be in [0, 65535]"),
        (["up", "--decode-workers", "0"], "--decode-workers must be >= 1"),
        (["up", "--expert-replicas", "2", "--expert-groups", "3"], "--expert-groups must be <= --expert-replicas"),
        (["up", "--worker-base-port", "80"], "--worker-base-port must be in"),
    ],
)
def test_bad_router_and_platform_flags_are_usage_errors(argv, message):
    result = cli(*argv)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_router_without_redis_says_so(tiny_models):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket closes
    result = cli("router", "--model", str(tiny_models["llama"]), "--redis-url", f"redis://127.0.0.1:{port}/0", "--port", "0")
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr
