"""The gRPC ``Generate`` service, on 127.0.0.1 over the REST server's engine: the same
output, parameters and error messages as REST, metadata, cancellation, health and reflection."""

from __future__ import annotations

import asyncio
import json
import threading

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from cleave.common.grpc_server import ServiceServer
from cleave.engine.outputs import RequestOutput
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import generate_pb2 as pb
from cleave.protogen.cleave.v1 import generate_pb2_grpc as pb_grpc
from cleave.router.grpc_api import GENERATE_SERVICE, start_grpc
from cleave.router.metrics import RouterMetrics
from test_api_server import wait_for

PROMPT = "The river ran quietly past the old mill, where"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Tell me about the river and the mill."},
]
LONG_TEXT = "The river ran past the mill. " * 200  # well over the test server's 1024 tokens
INSTANCE = "grpc-test-instance"
STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


class GrpcThread:
    """``ServiceServer``s on 127.0.0.1:0, run by an event loop in a thread of their own
    (grpc.aio binds a server to the loop it was made on)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test", daemon=True)
        self.thread.start()
        self.servers: list[ServiceServer] = []

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, engine, tokenizer, metrics: RouterMetrics, instance_id: str) -> str:
        """Start the Generate service over ``engine``; returns its address."""
        server = self.call(
            start_grpc("127.0.0.1", 0, engine, tokenizer, "tiny-llama", metrics, instance_id=instance_id, drain_grace=5)
        )
        self.servers.append(server)
        return f"127.0.0.1:{server.port}"

    def close(self) -> None:
        for server in self.servers:
            self.call(server.drain(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()


class GrpcApi:
    def __init__(self, address: str, metrics: RouterMetrics) -> None:
        self.address = address
        self.metrics = metrics
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.GenerateStub(self.channel)

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "cleave_router_requests_total", {"endpoint": "grpc_generate", "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture(scope="module")
def grpc_thread():
    thread = GrpcThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def grpc_api(api_server, grpc_thread):
    """The gRPC service over ``api_server``'s engine and tokenizer."""
    metrics = RouterMetrics()
    api = GrpcApi(grpc_thread.serve(api_server.engine, api_server.tokenizer, metrics, INSTANCE), metrics)
    yield api
    api.channel.close()


@pytest.fixture(scope="module")
def http(api_server):
    with httpx.Client(base_url=api_server.base_url, timeout=60) as client:
        yield client


def request(prompt=PROMPT, *, stop=(), request_id="", model="tiny-llama", **params) -> pb.GenerateRequest:
    """A GenerateRequest; ``prompt`` is a string, token ids, or chat messages (dicts)."""
    msg = pb.GenerateRequest(request_id=request_id, model=model, stop=list(stop), params=common_pb2.SamplingParams(**params))
    if isinstance(prompt, str):
        msg.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        msg.messages.CopyFrom(pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in prompt]))
    elif prompt is not None:
        msg.prompt_token_ids.CopyFrom(pb.TokenIds(ids=prompt))
    return msg


def generate(api: GrpcApi, msg: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    return list(api.stub.Generate(msg, timeout=60))


def joined(items: list[pb.GenerateResponse]) -> tuple[str, list[int]]:
    return "".join(i.text for i in items), [t for i in items for t in i.token_ids]


# -- output ---------------------------------------------------------------------------------


def test_greedy_output_equals_rest_and_the_reference(grpc_api, http, api_server, reference_greedy):
    prompt_ids = api_server.tokenizer.encode(PROMPT)
    expected = reference_greedy(prompt_ids, 24, ignore_eos=True)
    items = generate(grpc_api, request(max_tokens=24, temperature=0, ignore_eos=True))
    text, token_ids = joined(items)
    rest = http.post("/completions", json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 24,
                                           "temperature": 0, "ignore_eos": True}).json()
    assert token_ids == expected
    assert text == rest["choices"][0]["text"] == api_server.tokenizer.decode(expected)
    assert [i.finish_reason for i in items] == [0] * (len(items) - 1) + [LENGTH]
    assert [i.HasField("usage") for i in items] == [False] * (len(items) - 1) + [True]
    usage = items[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(prompt_ids), 24, len(prompt_ids) + 24
    )
    assert usage.prompt_tokens == rest["usage"]["prompt_tokens"]


def test_token_id_prompt_matches_the_string_prompt(grpc_api, api_server):
    by_text = joined(generate(grpc_api, request(max_tokens=12, temperature=0)))
    by_ids = joined(generate(grpc_api, request(api_server.tokenizer.encode(PROMPT), max_tokens=12, temperature=0)))
    assert by_ids == by_text


@pytest.mark.parametrize("max_tokens", [1, 7, 40])
def test_deltas_join_to_the_rest_text_and_only_the_last_item_finishes(grpc_api, http, max_tokens):
    items = generate(grpc_api, request(max_tokens=max_tokens, temperature=0))
    rest = http.post("/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).json()
    assert joined(items)[0] == rest["choices"][0]["text"]
    assert len(joined(items)[1]) == items[-1].usage.completion_tokens == rest["usage"]["completion_tokens"]
    assert all(i.finish_reason == 0 for i in items[:-1])
    assert common_pb2.FinishReason.Name(items[-1].finish_reason) == f"FINISH_REASON_{rest['choices'][0]['finish_reason'].upper()}"


def test_unset_optional_params_take_the_rest_defaults(grpc_api, http):
    # Unset max_tokens is 16 for a prompt; temperature 1 with a seed samples as REST does.
    items = generate(grpc_api, request(seed=5, ignore_eos=True))
    rest = http.post("/completions", json={"prompt": PROMPT, "seed": 5, "ignore_eos": True}).json()
    assert joined(items)[0] == rest["choices"][0]["text"]
    assert items[-1].usage.completion_tokens == 16


def test_seeded_sampling_with_a_float32_temperature_matches_rest(grpc_api, http):
    items = generate(grpc_api, request(max_tokens=24, temperature=0.7, top_p=0.9, seed=3, ignore_eos=True))
    rest = http.post("/completions", json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0.7, "top_p": 0.9,
                                           "seed": 3, "ignore_eos": True}).json()
    assert joined(items)[0] == rest["choices"][0]["text"]


def test_stop_string_truncates_like_rest(grpc_api, http):
    varied = {"prompt": "Once upon a time, a small robot named Pip", "temperature": 1.0, "seed": 7, "ignore_eos": True}
    full = http.post("/completions", json={**varied, "max_tokens": 40}).json()["choices"][0]["text"]
    start = len(full) // 3
    stop = next(full[i : i + 3] for i in range(start, len(full) - 3)
                if all(ch.isprintable() and not ch.isspace() and ch != "\ufffd" for ch in full[i : i + 3]))
    items = generate(grpc_api, request(varied["prompt"], stop=[stop], max_tokens=40, temperature=1.0, seed=7,
                                       ignore_eos=True))
    assert joined(items)[0] == full[: full.index(stop)]
    assert items[-1].finish_reason == STOP
    assert items[-1].usage.completion_tokens < 40


def test_logprobs_when_asked(grpc_api, http):
    items = generate(grpc_api, request(max_tokens=20, temperature=0, ignore_eos=True, logprobs=True))
    rest = http.post("/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                                           "logprobs": 1}).json()
    logprobs = [lp for i in items for lp in i.logprobs]
    assert all(len(i.logprobs) == len(i.token_ids) for i in items)
    assert len(logprobs) == 20 and all(lp <= 0 for lp in logprobs)
    assert logprobs == pytest.approx(rest["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)
    without = generate(grpc_api, request(max_tokens=5, temperature=0))
    assert all(not i.logprobs for i in without)


def test_chat_messages_match_rest_chat(grpc_api, http, api_server, reference_greedy):
    items = generate(grpc_api, request(MESSAGES, max_tokens=12, temperature=0, ignore_eos=True))
    rest = http.post("/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                                                "ignore_eos": True}).json()
    tokenizer = api_server.tokenizer
    ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True), add_special_tokens=False)
    assert joined(items) == (rest["choices"][0]["message"]["content"], reference_greedy(ids, 12, ignore_eos=True))
    assert items[-1].usage.prompt_tokens == rest["usage"]["prompt_tokens"] == len(ids)


def test_repeated_long_prompt_reports_cached_tokens(grpc_api):
    prompt = PROMPT * 8  # several full KV blocks
    generate(grpc_api, request(prompt, max_tokens=2, temperature=0))
    usage = generate(grpc_api, request(prompt, max_tokens=2, temperature=0))[-1].usage
    assert 0 < usage.cached_tokens <= usage.prompt_tokens


def test_request_id_is_echoed_or_assigned(grpc_api):
    items = generate(grpc_api, request(request_id="client-chosen-1", max_tokens=4, temperature=0))
    assert {i.request_id for i in items} == {"client-chosen-1"}
    assigned = {i.request_id for i in generate(grpc_api, request(max_tokens=4, temperature=0))}
    assert len(assigned) == 1 and assigned != {""}
    chat_assigned = generate(grpc_api, request(MESSAGES, max_tokens=2, temperature=0))[0].request_id
    assert chat_assigned.startswith("chatcmpl-") and chat_assigned not in assigned


def test_metadata_names_the_instance_and_no_workers_for_the_local_engine(grpc_api):
    call = grpc_api.stub.Generate(request(max_tokens=2, temperature=0), timeout=60)
    items = list(call)
    metadata = dict(call.initial_metadata())
    assert metadata["x-cleave-instance"] == INSTANCE
    assert "x-cleave-prefill-instance" not in metadata and "x-cleave-decode-instance" not in metadata
    assert call.code() == grpc.StatusCode.OK and items[-1].finish_reason != 0


def test_requests_are_counted(grpc_api):
    before = grpc_api.count("success"), grpc_api.count("client_error")
    generate(grpc_api, request(max_tokens=2, temperature=0))
    with pytest.raises(grpc.RpcError):
        generate(grpc_api, request(""))
    assert (grpc_api.count("success"), grpc_api.count("client_error")) == (before[0] + 1, before[1] + 1)
    assert grpc_api.count("server_error") == 0


# -- errors: the REST message, the mapped status --------------------------------------------

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
# (case, GenerateRequest kwargs, status, REST endpoint and body giving the same error)
ERROR_CASES = [
    ("unknown model", dict(model="gpt-4"), NOT_FOUND, ("completions", {"model": "gpt-4", "prompt": PROMPT})),
    ("empty prompt", dict(prompt=""), INVALID, ("completions", {"prompt": ""})),
    ("empty token ids", dict(prompt=[]), INVALID, ("completions", {"prompt": []})),
    ("token id past the vocabulary", dict(prompt=[1, 10**6]), INVALID, ("completions", {"prompt": [1, 10**6]})),
    ("prompt longer than the context", dict(prompt=LONG_TEXT), INVALID, ("completions", {"prompt": LONG_TEXT})),
    ("max_tokens too large", dict(prompt="hi", max_tokens=1024), INVALID,
     ("completions", {"prompt": "hi", "max_tokens": 1024})),
    ("max_tokens zero", dict(max_tokens=0), INVALID, ("completions", {"prompt": PROMPT, "max_tokens": 0})),
    ("negative temperature", dict(temperature=-0.1), INVALID, ("completions", {"prompt": PROMPT, "temperature": -0.1})),
    ("top_p zero", dict(top_p=0), INVALID, ("completions", {"prompt": PROMPT, "top_p": 0})),
    ("top_p above one", dict(top_p=1.5), INVALID, ("completions", {"prompt": PROMPT, "top_p": 1.5})),
    ("empty stop string", dict(stop=[""]), INVALID, ("completions", {"prompt": PROMPT, "stop": [""]})),
    ("stop token past the vocabulary", dict(stop_token_ids=[10**6]), INVALID,
     ("completions", {"prompt": PROMPT, "stop_token_ids": [10**6]})),
    ("bad message role", dict(prompt=[{"role": "robot", "content": "x"}]), INVALID,
     ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]})),
    ("tool message", dict(prompt=[{"role": "tool", "content": "42"}]), INVALID,
     ("chat/completions", {"messages": [{"role": "tool", "content": "42"}]})),
    ("chat unknown model", dict(prompt=MESSAGES, model="gpt-4"), NOT_FOUND,
     ("chat/completions", {"model": "gpt-4", "messages": MESSAGES})),
]


@pytest.mark.parametrize("case, kwargs, status, rest", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_gets_the_rest_message_and_the_mapped_status(grpc_api, http, case, kwargs, status, rest):
    with pytest.raises(grpc.RpcError) as failure:
        generate(grpc_api, request(**kwargs))
    path, body = rest
    envelope = http.post(f"/{path}", json={"model": "tiny-llama", **body}).json()["error"]
    error = failure.value
    assert error.code() == status
    assert error.details() == envelope["message"]
    trailing = dict(error.trailing_metadata())
    assert trailing["x-cleave-instance"] == INSTANCE
    assert trailing.get("x-cleave-error-param") == envelope["param"]
    assert trailing.get("x-cleave-error-code") == envelope["code"]


def test_no_input_is_invalid_argument(grpc_api):
    with pytest.raises(grpc.RpcError) as failure:
        generate(grpc_api, request(None))
    assert failure.value.code() == INVALID
    assert "prompt, prompt_token_ids or messages" in failure.value.details()


def test_a_running_request_id_cannot_be_reused(grpc_api, api_server, wait_engine_idle):
    call = grpc_api.stub.Generate(request(request_id="twice", max_tokens=1000, temperature=0, ignore_eos=True),
                                  timeout=60)
    try:
        next(call)
        with pytest.raises(grpc.RpcError) as failure:
            generate(grpc_api, request(request_id="twice", max_tokens=2))
        assert failure.value.code() == INVALID
        assert "twice" in failure.value.details()
    finally:
        call.cancel()
    wait_engine_idle(api_server.engine)


# -- cancellation ------------------------------------------------------------------------


def test_client_cancel_aborts_the_engine_request(grpc_api, api_server, wait_engine_idle):
    cancelled = grpc_api.count("cancelled")
    call = grpc_api.stub.Generate(request(max_tokens=1000, temperature=0, ignore_eos=True), timeout=60)
    received = [next(call) for _ in range(3)]
    assert all(i.finish_reason == 0 for i in received)
    call.cancel()
    wait_for(lambda: grpc_api.count("cancelled") == cancelled + 1, what="the call to be counted as cancelled")
    stats = wait_engine_idle(api_server.engine)
    assert stats["num_used_kv_blocks"] == 0
    assert grpc_api.metrics.registry.get_sample_value("cleave_router_requests_running") == 0


# -- health and reflection ----------------------------------------------------------------


def test_health_and_reflection_list_the_service(grpc_api):
    health = health_pb2_grpc.HealthStub(grpc_api.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=GENERATE_SERVICE), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    database = ProtoReflectionDescriptorDatabase(grpc_api.channel)
    assert GENERATE_SERVICE in database.get_services()
    proto = database.FindFileContainingSymbol(GENERATE_SERVICE)
    assert proto.name == "cleave/v1/generate.proto"


# -- which workers served a request -----------------------------------------------------------


class RemoteLikeEngine:
    """Answers every request with one finished token, naming the workers that ran it, as a
    remote engine client does."""

    max_model_len = 1024
    is_running = True

    async def generate(self, request_id, prompt_token_ids, params):
        yield RequestOutput(request_id, [5], finished=True, finish_reason="length", num_prompt_tokens=len(prompt_token_ids),
                            num_output_tokens=1, served_by={"prefill": "prefill-7", "decode": "decode-3"})

    async def abort(self, request_id):
        pass


def test_metadata_names_the_prefill_and_decode_workers(api_server, grpc_thread):
    address = grpc_thread.serve(RemoteLikeEngine(), api_server.tokenizer, RouterMetrics(), "r1")
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.GenerateStub(channel).Generate(request(max_tokens=1), timeout=60)
        items = list(call)
        metadata = dict(call.initial_metadata())
    assert (metadata["x-cleave-instance"], metadata["x-cleave-prefill-instance"], metadata["x-cleave-decode-instance"]) == (
        "r1", "prefill-7", "decode-3"
    )
    assert [i.token_ids for i in items] == [[5]]


def test_rest_headers_name_the_prefill_and_decode_workers(api_server, serve_app):
    from cleave.router.app import create_app

    app = create_app(RemoteLikeEngine(), api_server.tokenizer, "tiny-llama", api_server.model_path, instance_id="r1")
    with serve_app(app) as root_url:
        for path, body in (("completions", {"prompt": PROMPT}), ("chat/completions", {"messages": MESSAGES})):
            for stream in (False, True):
                with httpx.stream("POST", f"{root_url}/v1/{path}", json={**body, "stream": stream}, timeout=60) as response:
                    response.read()
                assert response.status_code == 200
                assert (response.headers["x-cleave-prefill-instance"], response.headers["x-cleave-decode-instance"]) == (
                    "prefill-7", "decode-3"
                )


def test_rest_has_no_worker_headers_with_the_local_engine(http):
    body = {"prompt": PROMPT, "max_tokens": 2}
    for stream in (False, True):
        with http.stream("POST", "/completions", json={**body, "stream": stream}) as response:
            response.read()
        assert response.status_code == 200 and response.headers["x-request-id"]
        assert "x-cleave-prefill-instance" not in response.headers
        assert "x-cleave-decode-instance" not in response.headers
    chat = http.post("/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert chat.status_code == 200
    assert not {"x-cleave-prefill-instance", "x-cleave-decode-instance"} & set(chat.headers)


# -- cleave serve: REST and gRPC side by side, drained together -----------------------------


def read_log(path, predicate, process, what: str) -> dict:
    """The first JSON log line of ``path`` that ``predicate`` accepts, waiting for it."""
    def find():
        assert process.poll() is None, f"cleave serve exited: {path.read_text()[-2000:]}"
        for line in path.read_text().splitlines():
            if line.startswith("{") and predicate(entry := json.loads(line)):
                return entry
        return None

    return wait_for(find, timeout=120, what=what)


def test_cleave_serve_runs_rest_and_grpc_and_drains_both_on_sigterm(tiny_models, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    log_path = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "cleave.cli", "serve", "--model", str(tiny_models["llama"]),
            "--served-model-name", "tiny-llama", "--port", "0", "--grpc-port", "0", "--instance-id", "serve-test",
            "--max-model-len", "512", "--num-kv-blocks", "64", "--num-threads", "1"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, "CLEAVE_LOG_LEVEL": "info"})
    try:
        grpc_address = read_log(log_path, lambda e: e.get("msg") == "grpc serving", process, "the gRPC server")["address"]
        running = read_log(log_path, lambda e: e.get("msg", "").startswith("Uvicorn running on "), process, "uvicorn")
        root_url = running["msg"].removeprefix("Uvicorn running on ").split()[0]
        rest = httpx.post(f"{root_url}/v1/completions", timeout=60,
                          json={"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert rest.status_code == 200
        with grpc.insecure_channel(grpc_address) as channel:
            stub = pb_grpc.GenerateStub(channel)
            assert joined(list(stub.Generate(request(max_tokens=8, temperature=0), timeout=60)))[0] == (
                rest.json()["choices"][0]["text"]
            )
            metrics = httpx.get(f"{root_url}/metrics", timeout=10).text
            assert 'cleave_router_requests_total{endpoint="grpc_generate",outcome="success"} 1.0' in metrics
            call = stub.Generate(
                request(max_tokens=300, temperature=0, ignore_eos=True), timeout=120
            )
            first = next(call)
            assert dict(call.initial_metadata())["x-cleave-instance"] == "serve-test"
            process.send_signal(signal.SIGTERM)
            items = [first, *call]  # the call in flight finishes during the drain
        assert joined(items)[0].startswith(rest.json()["choices"][0]["text"])
        assert items[-1].finish_reason == LENGTH and items[-1].usage.completion_tokens == 300
        assert process.wait(timeout=120) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    messages = [json.loads(line)["msg"] for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert "draining" in messages and "stopped" in messages
