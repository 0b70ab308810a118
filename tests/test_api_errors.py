"""Bad input gets a 4xx in OpenAI's error envelope, never a 500; engine failures get
a 500 envelope (or an error event mid-stream) and free the engine request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

LONG_TEXT = "The river ran past the mill. " * 200  # well over the test server's 1024 tokens
MSG = [{"role": "user", "content": "hi"}]

# (case, body, status, param, code); None means "not checked".
COMPLETION_CASES = [
    ("unknown model", {"model": "gpt-4", "prompt": "hi"}, 404, "model", "model_not_found"),
    ("missing prompt", {"model": "tiny-llama"}, 400, "prompt", "missing_required_parameter"),
    ("prompt wrong type", {"prompt": 3}, 400, "prompt", "invalid_value"),
    ("prompt mixed list", {"prompt": ["a", 1]}, 400, "prompt", "invalid_value"),
    ("empty prompt", {"prompt": ""}, 400, "prompt", None),
    ("empty token list", {"prompt": []}, 400, "prompt", None),
    ("batched prompts", {"prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ("batched token prompts", {"prompt": [[1, 2], [3]]}, 400, "prompt", "unsupported_parameter"),
    ("token id past the vocabulary", {"prompt": [1, 10**6]}, 400, "prompt", None),
    ("negative token id", {"prompt": [-1]}, 400, "prompt", None),
    ("prompt longer than the context", {"prompt": LONG_TEXT}, 400, "prompt", "context_length_exceeded"),
    ("prompt plus max_tokens over the context", {"prompt": "hi", "max_tokens": 1024}, 400, "max_tokens", "context_length_exceeded"),
    ("max_tokens zero", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("max_tokens not a number", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
    ("max_tokens fractional", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", "invalid_value"),
    ("negative temperature", {"prompt": "hi", "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ("temperature not a number", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ("top_p zero", {"prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("top_p above one", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("top_k below -1", {"prompt": "hi", "top_k": -2}, 400, "top_k", "invalid_value"),
    ("seed not an integer", {"prompt": "hi", "seed": "abc"}, 400, "seed", "invalid_value"),
    ("n above one", {"prompt": "hi", "n": 2}, 400, "n", "unsupported_parameter"),
    ("best_of above one", {"prompt": "hi", "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("presence penalty", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("frequency penalty", {"prompt": "hi", "frequency_penalty": -1}, 400, "frequency_penalty", "unsupported_parameter"),
    ("logit bias", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias", "unsupported_parameter"),
    ("echo", {"prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    ("suffix", {"prompt": "hi", "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    ("logprobs above one", {"prompt": "hi", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ("logprobs above five", {"prompt": "hi", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ("empty stop string", {"prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("stop wrong type", {"prompt": "hi", "stop": 5}, 400, "stop", "invalid_value"),
    ("stop token past the vocabulary", {"prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids", None),
    ("stream_options without stream", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("streamed and too long", {"prompt": LONG_TEXT, "stream": True}, 400, "prompt", "context_length_exceeded"),
]

CHAT_CASES = [
    ("unknown model", {"model": "gpt-4", "messages": MSG}, 404, "model", "model_not_found"),
    ("missing messages", {"model": "tiny-llama"}, 400, "messages", "missing_required_parameter"),
    ("empty messages", {"messages": []}, 400, "messages", None),
    ("messages not a list", {"messages": "hello"}, 400, "messages", "invalid_value"),
    ("unknown role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "invalid_value"),
    ("message without role", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "missing_required_parameter"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content[0]", "unsupported_parameter"),
    ("text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text", None),
    ("tools", {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "unsupported_parameter"),
    ("tool message", {"messages": [*MSG, {"role": "tool", "content": "42", "tool_call_id": "1"}]}, 400, "messages[1]", "unsupported_parameter"),
    ("json response format", {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format", "unsupported_parameter"),
    ("top_logprobs above one", {"messages": MSG, "logprobs": True, "top_logprobs": 5}, 400, "top_logprobs", "unsupported_parameter"),
    ("top_logprobs without logprobs", {"messages": MSG, "top_logprobs": 1}, 400, "top_logprobs", None),
    ("max_completion_tokens zero", {"messages": MSG, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    ("conversation longer than the context", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages", "context_length_exceeded"),
    ("n above one", {"messages": MSG, "n": 3}, 400, "n", "unsupported_parameter"),
    ("presence penalty", {"messages": MSG, "presence_penalty": 1}, 400, "presence_penalty", "unsupported_parameter"),
    ("temperature not a number", {"messages": MSG, "temperature": [1]}, 400, "temperature", "invalid_value"),
]


def assert_envelope(response: httpx.Response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == {500: "server_error", 503: "service_unavailable"}.get(status, "invalid_request_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert response.headers["x-cleave-instance"] == "test-instance"
    return error


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=60) as client:
        yield client


@pytest.mark.parametrize("case, body, status, param, code", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_completion_rejects(http, case, body, status, param, code):
    assert_envelope(http.post("/completions", json={"model": "tiny-llama", **body}), status, param, code)


@pytest.mark.parametrize("case, body, status, param, code", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_rejects(http, case, body, status, param, code):
    assert_envelope(http.post("/chat/completions", json={"model": "tiny-llama", **body}), status, param, code)


@pytest.mark.parametrize(
    "case, method, path, content, headers, status, code",
    [
        ("malformed JSON", "POST", "/completions", b'{"prompt": "hi",', {"content-type": "application/json"}, 400, "invalid_json"),
        ("empty body", "POST", "/chat/completions", b"", {"content-type": "application/json"}, 400, None),
        ("JSON array body", "POST", "/completions", b"[1, 2]", {"content-type": "application/json"}, 400, None),
        ("JSON string body", "POST", "/chat/completions", b'"hi"', {"content-type": "application/json"}, 400, None),
        ("wrong method", "GET", "/completions", None, {}, 405, "method_not_allowed"),
        ("unknown route", "GET", "/engines", None, {}, 404, "not_found"),
        ("unknown model card", "GET", "/models/gpt-4", None, {}, 404, "model_not_found"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_malformed_requests(http, case, method, path, content, headers, status, code):
    assert_envelope(http.request(method, path, content=content, headers=headers), status, code=code)


def test_openai_client_raises_typed_errors(openai_client):
    with pytest.raises(openai.NotFoundError) as not_found:
        openai_client.completions.create(model="gpt-4", prompt="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.chat.completions.create(model="tiny-llama", messages=MSG, n=2)
    assert bad.value.param == "n"


def test_client_errors_are_counted_and_no_500_came_from_them(api_server, http):
    before = api_server.metric("cleave_router_requests_total", endpoint="completions", outcome="client_error")
    errors = api_server.metric("cleave_router_requests_total", endpoint="completions", outcome="server_error")
    http.post("/completions", json={"model": "tiny-llama", "prompt": ""})
    after = api_server.metric("cleave_router_requests_total", endpoint="completions", outcome="client_error")
    assert after == before + 1
    assert api_server.metric("cleave_router_requests_total", endpoint="completions", outcome="server_error") == errors == 0


class FailingEngine:
    """The real engine, made to fail after its first output: what a crashing engine
    (or a lost remote worker) looks like to the front end."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def start(self):
        return self.engine.start()

    def shutdown(self):
        return self.engine.shutdown()

    async def generate(self, request_id, prompt_token_ids, params):
        outputs = self.engine.generate(request_id, prompt_token_ids, params)
        try:
            async for output in outputs:
                yield output
                raise RuntimeError("injected engine failure")
        finally:
            await outputs.aclose()

    async def abort(self, request_id):
        await self.engine.abort(request_id)


@pytest.fixture(scope="module")
def failing_server(tiny_models, serve_app):
    from cleave.engine.async_engine import AsyncLLMEngine
    from cleave.engine.config import EngineConfig
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.app import create_app

    path = str(tiny_models["llama"])
    engine = AsyncLLMEngine(EngineConfig(model=path, max_model_len=256, num_kv_blocks=32, num_threads=1))
    app = create_app(FailingEngine(engine), Tokenizer.from_pretrained(path), "tiny-llama", path,
                     instance_id="test-instance", start_engine=True)
    with serve_app(app) as root_url:
        yield root_url, engine


def test_engine_failure_is_a_500_envelope(failing_server, wait_engine_idle, caplog):
    root_url, engine = failing_server
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{root_url}/v1/completions", json=body, timeout=60)
    error = assert_envelope(response, 500)
    assert "injected" not in error["message"]  # internals stay in the log
    assert any(r.name == "cleave.router" and r.exc_info for r in caplog.records)
    wait_engine_idle(engine)


def test_engine_failure_mid_stream_sends_an_error_event(failing_server, wait_engine_idle):
    root_url, engine = failing_server
    body = {"model": "tiny-llama", "messages": MSG, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{root_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [e.removeprefix("data: ") for e in response.read().decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    wait_engine_idle(engine)


def test_stopped_engine_is_a_503(tiny_models, serve_app):
    from cleave.engine.async_engine import AsyncLLMEngine
    from cleave.engine.config import EngineConfig
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.app import create_app

    path = str(tiny_models["llama"])
    engine = AsyncLLMEngine(EngineConfig(model=path, max_model_len=256, num_kv_blocks=32, num_threads=1))
    app = create_app(engine, Tokenizer.from_pretrained(path), "tiny-llama", path, instance_id="test-instance")
    with serve_app(app) as root_url:  # the engine is never started
        assert_envelope(httpx.get(f"{root_url}/health", timeout=10), 503, code="engine_unavailable")
        response = httpx.post(f"{root_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert_envelope(response, 503, code="engine_unavailable")
