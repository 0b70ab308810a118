"""``/v1/chat/completions`` through the official ``openai`` client, on the real engine."""

from __future__ import annotations

import json

import httpx

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me about the river and the mill."},
]
# Seeded sampling gives the tiny random model varied text (greedy repeats itself).
VARIED = dict(temperature=1.0, seed=11, extra_body={"ignore_eos": True})


def chat(client, **kwargs):
    kwargs.setdefault("model", "tiny-llama")
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(**kwargs)


def stream_chat(client, **kwargs):
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def prompt_ids(tokenizer, messages=MESSAGES):
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def test_greedy_reply_is_the_decode_of_the_engines_tokens(openai_client, api_server, reference_greedy):
    ids = prompt_ids(api_server.tokenizer)
    expected = reference_greedy(ids, 20, ignore_eos=True)
    response = chat(openai_client, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == api_server.tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == 20
    assert response.usage.total_tokens == len(ids) + 20


def test_stream_starts_with_the_role_and_ends_with_the_finish_reason(openai_client):
    full = chat(openai_client, max_tokens=16, **VARIED).choices[0]
    text, chunks = stream_chat(openai_client, max_tokens=16, **VARIED)
    assert text == full.message.content
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert chunks[-1].choices[0].finish_reason == full.finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_include_usage_chunk(openai_client, api_server):
    text, chunks = stream_chat(openai_client, max_tokens=6, temperature=0, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == len(prompt_ids(api_server.tokenizer))
    assert last.usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert len({(c.id, c.created) for c in chunks}) == 1


def test_text_parts_equal_a_string_content(openai_client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the mill."}]}]
    plain = [{"role": "user", "content": "Tell me about the mill."}]
    a = chat(openai_client, messages=parts, max_tokens=8, temperature=0)
    b = chat(openai_client, messages=plain, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_max_completion_tokens_wins_over_max_tokens(openai_client):
    response = chat(openai_client, max_completion_tokens=3, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 3


def test_stop_string_in_chat(openai_client):
    full = chat(openai_client, max_tokens=40, **VARIED).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(len(full) // 3, len(full) - 2) if full[i : i + 2].isalnum())
    expected = full[: full.index(stop)]
    response = chat(openai_client, max_tokens=40, stop=stop, **VARIED)
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    text, chunks = stream_chat(openai_client, max_tokens=40, stop=[stop], **VARIED)
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_chat_is_reproducible(openai_client):
    first = chat(openai_client, max_tokens=20, **VARIED).choices[0].message.content
    assert chat(openai_client, max_tokens=20, **VARIED).choices[0].message.content == first
    assert stream_chat(openai_client, max_tokens=20, **VARIED)[0] == first


def test_logprobs_of_the_chosen_tokens(openai_client):
    response = chat(openai_client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=1)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(entry.logprob <= 0 and entry.top_logprobs[0].token == entry.token for entry in content)
    _, chunks = stream_chat(openai_client, max_tokens=5, temperature=0, logprobs=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_wire_format_leaves_unset_delta_fields_out(api_server):
    body = {"model": "tiny-llama", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{api_server.base_url}/chat/completions", json=body, timeout=60) as response:
        raw = response.read().decode()
    events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
