"""The whole platform as `cleave up` starts it: real processes on 127.0.0.1, a real Redis,
the router in front of prefill, decode, the KV store and (for MoE) two expert replicas.
Greedy output must equal transformers through every hop, under concurrency, with a
reused prefix, and across a decode worker killed mid-stream."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from cleave.launcher import wait_until
from local_platform import MAX_TOKENS, Platform, grpc_generate
from reference import assert_greedy_equal, load_hf, mixed_prompts

WORKER_FLAGS = ["--num-kv-blocks", "256", "--max-model-len", "512", "--block-size", "16"]

@pytest.fixture(scope="module", params=["llama", "mixtral"])
def platform(request, tiny_models, tmp_path_factory):
    family = request.param
    flags = ["--prefill-workers", "2", "--decode-workers", "2"]
    if family == "mixtral":
        # Three replicas in two groups: replica 2 is a spare of replica 0's experts.
        flags += ["--expert-replicas", "3", "--expert-groups", "2"]
    p = Platform(tmp_path_factory.mktemp(f"platform-{family}"), tiny_models[family], *flags, *WORKER_FLAGS)
    p.family = family
    try:
        p.up()
        yield p
    finally:
        p.down()


@pytest.fixture(scope="module")
def hf_model(platform):
    return load_hf(platform.model)


@pytest.fixture(scope="module")
def vocab_size(platform) -> int:
    return json.loads((platform.model / "config.json").read_text())["vocab_size"]


# -- exactness -------------------------------------------------------------------------------


def test_greedy_through_every_hop_equals_transformers(platform, hf_model, vocab_size):
    prompts = mixed_prompts(vocab_size, 4, seed=5, min_len=3, max_len=60)
    outputs = [grpc_generate(platform, prompt)[0] for prompt in prompts]
    assert_greedy_equal(hf_model, prompts, outputs, MAX_TOKENS)


def test_sixteen_concurrent_requests_spread_over_both_pools_and_stay_exact(platform, hf_model, vocab_size):
    prompts = mixed_prompts(vocab_size, 16, seed=6, min_len=3, max_len=70)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: grpc_generate(platform, p), prompts))
    assert_greedy_equal(hf_model, prompts, [tokens for tokens, _, _ in results], MAX_TOKENS)
    served = {(meta["x-cleave-prefill-instance"], meta["x-cleave-decode-instance"]) for _, _, meta in results}
    assert {p for p, _ in served} == {"prefill-0", "prefill-1"}
    assert {d for _, d in served} == {"decode-0", "decode-1"}
    if platform.family == "mixtral":
        # Both expert groups ran: every forward pass of the workers called the replicas.
        def experts_serving() -> bool:
            snapshot = platform.admin()["roles"]["expert"]
            busy = [e for e in snapshot if e["load"].get("num_calls", 0) > 0]
            # Both groups ran (the spare of group 0 may have stayed idle).
            return len(snapshot) == 3 and all(e["health"] == "SERVING" for e in snapshot) and len(busy) >= 2

        assert wait_until(experts_serving, 15), platform.admin()["roles"]["expert"]


def test_a_reused_prefix_is_cached_and_exact(platform, hf_model, vocab_size):
    shared = mixed_prompts(vocab_size, 1, seed=7, min_len=64, max_len=64)[0]
    prompts = [shared + tail for tail in ([1, 2, 3], [4, 5], [6])]
    results = [grpc_generate(platform, prompt) for prompt in prompts]
    assert_greedy_equal(hf_model, prompts, [tokens for tokens, _, _ in results], MAX_TOKENS)
    # The first request computed the prefix; the later ones found all 4 of its blocks,
    # in the prefill worker's own cache (kv-aware routing sends them back there) or the store.
    cached = [last.usage.cached_tokens for _, last, _ in results]
    assert cached[1:] == [64, 64], cached
    assert len({meta["x-cleave-prefill-instance"] for _, _, meta in results}) == 1


def test_rest_openai_client_streams_through_the_platform(platform, hf_model):
    from openai import OpenAI

    from cleave.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(platform.model)
    client = OpenAI(base_url=f"{platform.base_url}/v1", api_key="unused")
    prompt = "The river ran quietly past the old mill, where"
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(hf_greedy_tokens(hf_model, ids, MAX_TOKENS))
    raw = client.completions.with_raw_response.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                                      temperature=0, extra_body={"ignore_eos": True})
    assert raw.parse().choices[0].text == expected
    assert raw.headers["x-cleave-prefill-instance"].startswith("prefill-")
    assert raw.headers["x-cleave-decode-instance"].startswith("decode-")
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected


def hf_greedy_tokens(model, prompt, max_tokens):
    from reference import hf_greedy

    return hf_greedy(model, prompt, max_tokens).tokens


def test_bad_input_is_refused_at_the_router(platform):
    assert platform.complete([], max_tokens=4).status_code == 400
    assert platform.complete([1, 2], max_tokens=100_000).status_code == 400
    response = platform.complete([10**9], max_tokens=4)
    assert response.status_code == 400 and "not a token id" in response.text
    from cleave.protogen.cleave.v1 import common_pb2, generate_pb2, generate_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(generate_pb2.GenerateRequest(model="tiny", params=common_pb2.SamplingParams()),
                               timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_status_and_admin_list_every_instance_by_role(platform):
    snapshot = platform.admin()
    roles = snapshot["roles"]
    assert [i["instance_id"] for i in roles["prefill"]] == ["prefill-0", "prefill-1"]
    assert [i["instance_id"] for i in roles["decode"]] == ["decode-0", "decode-1"]
    assert [i["instance_id"] for i in roles["kvstore"]] == ["kvstore-0"]
    assert [i["instance_id"] for i in roles["router"]] == ["router-0"]

    def all_serving() -> bool:
        roles = platform.admin()["roles"]
        return all(i["health"] == "SERVING" for role in ("prefill", "decode", "kvstore") for i in roles[role])

    assert wait_until(all_serving, 15), platform.admin()
    assert all("num_free_kv_blocks" in i["load"] for i in roles["decode"])
    status = platform.cleave("status", timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("redis", "kvstore-0", "prefill-1", "decode-1", "router-0"):
        assert name in status.stdout


# -- failures (these change the platform: keep them last) --------------------------------------


def test_decode_worker_killed_mid_stream_costs_the_client_nothing(platform, hf_model, vocab_size):
    prompt = mixed_prompts(vocab_size, 1, seed=8, min_len=20, max_len=20)[0]
    max_tokens = 400
    resumes_before = platform.metric("cleave_router_decode_resumes_total")
    killed: list[str] = []
    items = 0

    def kill_after_a_few(item, call) -> None:
        nonlocal items
        items += 1
        if items == 3:
            victim = dict(call.initial_metadata())["x-cleave-decode-instance"]
            platform.kill(victim)
            killed.append(victim)

    tokens, last, meta = grpc_generate(platform, prompt, max_tokens, on_item=kill_after_a_few)
    assert killed, "the stream ended before the decode worker could be killed"
    assert len(tokens) == max_tokens and last.finish_reason == 2  # LENGTH
    assert_greedy_equal(hf_model, [prompt], [tokens], max_tokens)
    assert platform.metric("cleave_router_decode_resumes_total") == resumes_before + 1
    # The dead worker drops out of the registry once its key expires.
    assert wait_until(lambda: killed[0] not in [i["instance_id"] for i in platform.admin()["roles"]["decode"]], 15)


def test_expert_replica_death_fails_over_then_503_when_none_holds_an_expert(platform, hf_model, vocab_size):
    if platform.family != "mixtral":
        pytest.skip("dense model: no expert replicas")
    prompt = mixed_prompts(vocab_size, 1, seed=9, min_len=10, max_len=10)[0]
    platform.kill("expert-0")  # expert-2 holds the same experts
    tokens, _, _ = grpc_generate(platform, prompt)
    assert_greedy_equal(hf_model, [prompt], [tokens], MAX_TOKENS)
    platform.kill("expert-2")  # now nobody holds group 0
    # Fails fast with a clear answer: the call's own timeout would fail the test on a hang.
    response = platform.complete(prompt)
    assert response.status_code == 503, response.text
    assert "expert" in response.json()["error"]["message"]
