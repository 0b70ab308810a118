"""``/v1/completions`` through the official ``openai`` client, on the real engine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

PROMPT = "The river ran quietly past the old mill, where"
# The tiny model's random weights repeat themselves under greedy decoding; seeded
# sampling gives varied text to cut stop strings from.
VARIED = dict(prompt="Once upon a time, a small robot named Pip", temperature=1.0, seed=7, extra_body={"ignore_eos": True})


def complete(client, **kwargs):
    kwargs.setdefault("model", "tiny-llama")
    kwargs.setdefault("prompt", PROMPT)
    return client.completions.create(**kwargs)


def stream_text(client, **kwargs):
    chunks = list(complete(client, stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def test_greedy_text_is_the_decode_of_the_engines_tokens(openai_client, api_server, reference_greedy):
    prompt_ids = api_server.tokenizer.encode(PROMPT)
    expected_ids = reference_greedy(prompt_ids, 24, ignore_eos=True)
    response = complete(openai_client, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert choice.text == api_server.tokenizer.decode(expected_ids)
    assert choice.finish_reason == "length"
    assert response.object == "text_completion"
    assert response.model == "tiny-llama"
    assert response.id.startswith("cmpl-")
    usage = response.usage
    assert usage.prompt_tokens == len(prompt_ids)
    assert usage.completion_tokens == 24
    assert usage.total_tokens == len(prompt_ids) + 24
    assert usage.prompt_tokens_details.cached_tokens >= 0


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_streamed_text_joins_to_the_non_streamed_text(openai_client, max_tokens):
    full = complete(openai_client, max_tokens=max_tokens, temperature=0).choices[0]
    text, finish, chunks = stream_text(openai_client, max_tokens=max_tokens, temperature=0)
    assert text == full.text
    assert finish == [full.finish_reason]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)


def test_token_id_prompt_and_one_element_list_match_the_string_prompt(openai_client, api_server):
    by_text = complete(openai_client, max_tokens=12, temperature=0)
    by_ids = complete(openai_client, prompt=api_server.tokenizer.encode(PROMPT), max_tokens=12, temperature=0)
    by_list = complete(openai_client, prompt=[PROMPT], max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == by_list.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens


def pick_stop(text: str, start: int, length: int = 3) -> str:
    for i in range(start, len(text) - length):
        window = text[i : i + length]
        if all(ch.isprintable() and not ch.isspace() and ch != "\ufffd" for ch in window):
            return window
    raise AssertionError(f"no visible stop string in {text!r}")


def test_stop_string_truncates_and_finishes_with_stop(openai_client):
    full = complete(openai_client, max_tokens=40, **VARIED).choices[0].text
    stop = pick_stop(full, len(full) // 3)
    expected = full[: full.index(stop)]
    response = complete(openai_client, max_tokens=40, stop=[stop], **VARIED)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 40
    text, finish, _ = stream_text(openai_client, max_tokens=40, stop=stop, **VARIED)
    assert text == expected
    assert finish == ["stop"]


def test_earliest_of_several_stop_strings_wins(openai_client):
    full = complete(openai_client, max_tokens=40, **VARIED).choices[0].text
    early, late = pick_stop(full, 5), pick_stop(full, len(full) // 2)
    cut = min(full.index(early), full.index(late))
    response = complete(openai_client, max_tokens=40, stop=[late, early], **VARIED)
    assert response.choices[0].text == full[:cut]


def test_seeded_sampling_is_reproducible(openai_client):
    def sample(seed, stream=False):
        kwargs = dict(max_tokens=24, temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
        if stream:
            return stream_text(openai_client, **kwargs)[0]
        return complete(openai_client, **kwargs).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(1234, stream=True) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_logprobs_cover_every_generated_token(openai_client):
    response = complete(openai_client, max_tokens=20, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == response.usage.completion_tokens == 20
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.text_offset[0] == 0
    assert [list(top) for top in logprobs.top_logprobs] == [[t] for t in logprobs.tokens]


def test_stop_token_id_ends_the_request_on_that_token(openai_client, api_server, reference_greedy):
    prompt_ids = api_server.tokenizer.encode(PROMPT)
    expected = reference_greedy(prompt_ids, 20, ignore_eos=True)
    stop_id = expected[2]
    response = complete(
        openai_client, prompt=prompt_ids, max_tokens=20, temperature=0,
        extra_body={"stop_token_ids": [stop_id], "ignore_eos": True},
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == expected.index(stop_id) + 1


def test_include_usage_sends_a_last_chunk_with_usage_and_no_choices(openai_client):
    _, _, chunks = stream_text(openai_client, max_tokens=9, temperature=0, stream_options={"include_usage": True})
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 9
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(api_server):
    body = {"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{api_server.base_url}/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-cleave-instance"] == "test-instance"
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert "usage" not in payloads[0]


def test_concurrent_requests_match_sequential_ones(openai_client):
    prompts = [f"{PROMPT} {word}" for word in ("grain", "water", "bread", "robot")]
    sequential = [complete(openai_client, prompt=p, max_tokens=16, temperature=0).choices[0].text for p in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(lambda p: complete(openai_client, prompt=p, max_tokens=16, temperature=0).choices[0].text, prompts))
    assert concurrent == sequential


def test_repeated_long_prompt_reports_cached_tokens(openai_client):
    prompt = PROMPT * 8  # several full KV blocks
    complete(openai_client, prompt=prompt, max_tokens=2, temperature=0)
    again = complete(openai_client, prompt=prompt, max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= again.usage.prompt_tokens


class OneTokenAtATimeEngine:
    """Streams the given token ids one output each, as the engine does for a client that
    keeps up with its steps (the real engine merges outputs for a client that lags, so it
    cannot pin one chunk per token)."""

    max_model_len = 1024
    is_running = True

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids

    async def generate(self, request_id, prompt_token_ids, params):
        from cleave.engine.outputs import RequestOutput

        for i, token_id in enumerate(self.token_ids, start=1):
            last = i == len(self.token_ids)
            yield RequestOutput(request_id, [token_id], finished=last, finish_reason="length" if last else None,
                                num_prompt_tokens=len(prompt_token_ids), num_output_tokens=i)

    async def abort(self, request_id):
        pass


def test_a_token_that_ends_inside_a_character_streams_as_a_chunk_without_text(api_server, serve_app):
    import openai

    from cleave.router.app import create_app

    text = "naïve 🙂 robot"
    tokenizer = api_server.tokenizer
    token_ids = tokenizer.encode(text)
    inside = [tokenizer.decode(token_ids[:i]).endswith("\ufffd") for i in range(1, len(token_ids) + 1)]
    assert sum(inside) == 4  # the first byte of ï and three of 🙂's four
    app = create_app(OneTokenAtATimeEngine(token_ids), tokenizer, "tiny-llama", api_server.model_path)
    with serve_app(app) as root_url:
        client = openai.OpenAI(base_url=f"{root_url}/v1", api_key="unused", max_retries=0, timeout=60)
        _, finish, chunks = stream_text(client, max_tokens=len(token_ids))
        chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=len(token_ids), stream=True)
        chat_texts = [c.choices[0].delta.content for c in chat if c.choices and c.choices[0].delta.content is not None]
    # A chunk per token, as vLLM streams them: empty while a character is incomplete.
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert [t == "" for t in texts] == inside
    assert "".join(texts) == text and not any("\ufffd" in t for t in texts)
    assert finish == ["length"]
    assert chat_texts[0] == ""  # the role's chunk
    assert [t == "" for t in chat_texts[1:]] == inside
    assert "".join(chat_texts) == text and not any("\ufffd" in t for t in chat_texts)


def completion_chunk(request_id, model, text):
    from cleave.router.protocol.completion import CompletionResponseStreamChoice, CompletionStreamResponse

    return CompletionStreamResponse(id=request_id, model=model, created=1700000000,
                                    choices=[CompletionResponseStreamChoice(text=text)])


def chat_chunk(request_id, model, text):
    from cleave.router.protocol.chat import ChatCompletionResponseStreamChoice, ChatCompletionStreamResponse, DeltaMessage

    return ChatCompletionStreamResponse(id=request_id, model=model, created=1700000000,
                                        choices=[ChatCompletionResponseStreamChoice(delta=DeltaMessage(content=text))])


@pytest.mark.parametrize("make_chunk", [completion_chunk, chat_chunk])
@pytest.mark.parametrize("include_usage", [False, True])
def test_text_chunk_events_are_the_models_own_json(make_chunk, include_usage):
    from cleave.router.serving import TextEvents, sse_event

    request_id, model = 'cmpl-"quoted"', "model\\with \"escapes\" cleave-text-mark"
    events = TextEvents(make_chunk(request_id, model, TextEvents.MARK).dump(include_usage))
    for text in ("", " plain", "naïve 🙂", 'quote " backslash \\ newline \n tab \t nul \x00', "cleave-text-mark"):
        expected = make_chunk(request_id, model, text)
        assert events.event(text) == sse_event(expected.dump(include_usage))


def test_every_chunk_of_a_stream_has_one_id_and_created(openai_client):
    _, _, chunks = stream_text(openai_client, max_tokens=12, temperature=0, stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens == 12 and len(chunks) > 2
    assert len({(c.id, c.created) for c in chunks}) == 1
