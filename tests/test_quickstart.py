"""The README's first steps, on the default platform: `cleave up` (what `make up` runs)
starts Redis, the KV store, two expert replicas, a prefill and two decode workers and the
router, serving the SmolLM2-derived MoE model; then the official `openai` client streams
a chat completion and a plain grpcio client calls the public Generate."""

from __future__ import annotations

import grpc
import openai

from local_platform import Platform

QUESTION = "What is the capital of France? Answer in one word."


def test_up_then_openai_and_grpc_clients_talk_to_the_moe_platform(smollm2_moe_dir, tmp_path):
    # The model folder the zoo built (`make up` passes the name, which resolves to it), so
    # that the run's own CLEAVE_HOME does not build a second copy.
    platform = Platform(tmp_path / "home", smollm2_moe_dir, served_model_name="smollm2-moe")
    try:
        platform.up()
        roles = platform.admin()["roles"]
        assert {role: len(roles.get(role, [])) for role in ("prefill", "decode", "kvstore", "expert", "router")} == {
            "prefill": 1, "decode": 2, "kvstore": 1, "expert": 2, "router": 1}

        client = openai.OpenAI(base_url=f"{platform.base_url}/v1", api_key="unused")
        stream = client.chat.completions.create(
            model="smollm2-moe", messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0,
            stream=True,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert "Paris" in text, text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")

        # A plain grpcio client of cleave.v1.Generate, as docs/api.md shows it.
        from cleave.protogen.cleave.v1 import common_pb2, generate_pb2, generate_pb2_grpc

        request = generate_pb2.GenerateRequest(
            model="smollm2-moe",
            messages=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(role="user", content=QUESTION)]),
            params=common_pb2.SamplingParams(temperature=0, max_tokens=16),
        )
        with grpc.insecure_channel(f"127.0.0.1:{platform.grpc_port}") as channel:
            items = list(generate_pb2_grpc.GenerateStub(channel).Generate(request, timeout=120))
        assert "".join(item.text for item in items) == text
        assert items[-1].finish_reason == common_pb2.FINISH_REASON_STOP or items[-1].usage.completion_tokens == 16
        # The expert replicas did the MoE layers' work.
        experts = platform.admin()["roles"]["expert"]
        assert all(e["load"].get("num_calls", 0) > 0 for e in experts), experts
    finally:
        platform.down()
    assert "not running" in platform.cleave("status").stdout
