"""Locust load test of Cleave: users that stream from the OpenAI REST API (or, with
--grpc-host, from cleave.v1.Generate) and record, per workload shape, time to first token
(request type TTFT), the gap between streamed chunks (ITL), the time per output token after
the first (TPOT) and the whole request (E2E) as Locust statistics, plus output tokens/s. See
docs/loadtest.md.

    python -m locust -f loadtest/locustfile.py --headless -H http://127.0.0.1:8000 \
        -u 4 -r 4 -t 60s --shape random --csv loadtest/results/random --html loadtest/results/random.html
"""

from __future__ import annotations

import atexit
import csv
import itertools
import json
import math
import time
from collections import defaultdict

import gevent
import grpc.experimental.gevent as grpc_gevent
import requests
from locust import LoadTestShape, User, events, task
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

from workloads import SHAPES, ChatWorkload, Job, TraceReplay, make_workload

grpc_gevent.init_gevent()  # before any channel: grpcio's I/O must yield to gevent

import grpc  # noqa: E402

from cleave.protogen.cleave.v1 import common_pb2, generate_pb2, generate_pb2_grpc  # noqa: E402

DEFAULT_TRACE = "../shared/datasets/traces/mooncake_conversation_trace.jsonl"


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    group = parser.add_argument_group("Cleave", "workload shapes and load shapes (docs/loadtest.md)")
    group.add_argument("--shape", choices=SHAPES, default="fixed", help="workload shape")
    group.add_argument("--model", default="", help="served model name; empty asks -H's /v1/models")
    group.add_argument("--grpc-host", default="", help="HOST:PORT of cleave.v1.Generate; set, the gRPC user runs")
    group.add_argument("--seed", type=int, default=0, help="seed of prompts and lengths")
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--prompt-tokens", type=int, default=128, help="fixed: prompt length")
    group.add_argument("--output-tokens", type=int, default=32, help="fixed, chat: tokens to generate")
    group.add_argument("--prompt-tokens-range", default="32:256", help="random: LOW:HIGH prompt length")
    group.add_argument("--output-tokens-range", default="8:64", help="random: LOW:HIGH output length")
    group.add_argument("--min-token-id", type=int, default=100, help="lowest token id of synthetic prompts")
    group.add_argument("--max-token-id", type=int, default=1000, help="token ids stay below this (the vocabulary)")
    group.add_argument("--chat-turns", type=int, default=4, help="chat: turns before a conversation restarts")
    group.add_argument("--chat-turn-words", type=int, default=24, help="chat: words per user turn")
    group.add_argument("--chat-system-words", type=int, default=96, help="chat: words of the shared system prompt")
    group.add_argument("--trace", default=DEFAULT_TRACE, help="mooncake: the trace (JSON lines)")
    group.add_argument("--trace-scale", type=float, default=1.0, help="mooncake: arrival times x this (0.5: twice as fast)")
    group.add_argument("--length-scale", type=float, default=1 / 32, help="mooncake: token lengths x this")
    group.add_argument("--trace-limit", type=int, default=0, help="mooncake: replay only the first N requests (0: all)")
    group.add_argument("--max-prompt-tokens", type=int, default=448, help="mooncake: cap on a scaled prompt")
    group.add_argument("--max-output-tokens", type=int, default=64, help="mooncake: cap on a scaled output")
    group.add_argument("--load-shape", choices=("", "step", "ramp"), default="",
                       help="step or ramp the user count up to -u at -r users/s for -t (default 60s)")
    group.add_argument("--step-users", type=int, default=1, help="step: users added per step")
    group.add_argument("--step-seconds", type=float, default=10.0, help="step: seconds per step")
    group.add_argument("--ramp-seconds", type=float, default=30.0, help="ramp: seconds to reach -u users")


class Tally:
    """Output tokens per statistics name, for the tokens/s summary at test stop."""

    def __init__(self) -> None:
        self.tokens: dict[str, int] = defaultdict(int)
        self.requests: dict[str, int] = defaultdict(int)
        self.started = self.stopped = 0.0

    def rows(self) -> list[tuple[str, int, int, float, float]]:
        seconds = max((self.stopped or time.monotonic()) - self.started, 1e-9)
        return [(name, self.requests[name], tokens, seconds, tokens / seconds) for name, tokens in sorted(self.tokens.items())]


TALLY = Tally()
REPLAY: TraceReplay | None = None


@events.init.add_listener
def pick_classes(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is None:
        return
    if len(environment.user_classes) > 1:  # no class named on the command line: the flag decides
        wanted = GrpcGenerateUser if options.grpc_host else OpenAIStreamUser
        environment.user_classes = [wanted]
    if not options.load_shape:
        environment.shape_class = None
    if options.csv_prefix:
        atexit.register(write_final_stats, environment, options.csv_prefix)


def write_final_stats(environment, prefix: str) -> None:
    """Rewrite <prefix>_stats.csv once Locust has closed it: its periodic writer (every
    second) misses requests that finish during the graceful stop."""
    with open(f"{prefix}_stats.csv", "w", newline="") as out:
        StatsCSV(environment, PERCENTILES_TO_REPORT).requests_csv(csv.writer(out))


@events.test_start.add_listener
def on_test_start(environment, **_kwargs) -> None:
    global REPLAY
    options = environment.parsed_options
    TALLY.__init__()
    TALLY.started = time.monotonic()
    REPLAY = TraceReplay(options) if options.shape == "mooncake" else None


@events.test_stop.add_listener
def on_test_stop(environment, **_kwargs) -> None:
    TALLY.stopped = time.monotonic()
    rows = TALLY.rows()
    print("\nOutput tokens/s (tokens counted from the streams, over the whole run)")
    print(f"{'name':<24}{'requests':>10}{'tokens':>10}{'seconds':>10}{'tokens/s':>12}")
    for name, count, tokens, seconds, rate in rows:
        print(f"{name:<24}{count:>10}{tokens:>10}{seconds:>10.1f}{rate:>12.2f}")
    prefix = environment.parsed_options.csv_prefix if environment.parsed_options else None
    if prefix:
        with open(f"{prefix}_tokens.csv", "w") as out:
            out.write("Name,Requests,Output Tokens,Seconds,Output Tokens/s\n")
            out.writelines(f"{n},{c},{t},{s:.3f},{r:.3f}\n" for n, c, t, s, r in rows)


class StreamTimer:
    """Times one streamed request and fires its Locust request events."""

    def __init__(self, environment, name: str) -> None:
        self.fire = environment.events.request.fire
        self.name = name
        self.start = self.last = self.first = time.perf_counter()
        self.num_tokens = 0
        self.num_chunks = 0

    def _event(self, kind: str, seconds: float, length: int = 0, exception: Exception | None = None) -> None:
        self.fire(request_type=kind, name=self.name, response_time=seconds * 1000, response_length=length,
                  exception=exception, context={})

    def chunk(self, num_tokens: int) -> None:
        """A streamed chunk carrying num_tokens output tokens arrived."""
        now = time.perf_counter()
        if self.num_chunks == 0:
            self.first = now
            self._event("TTFT", now - self.start)
        else:
            self._event("ITL", now - self.last)
        self.last = now
        self.num_chunks += 1
        self.num_tokens += num_tokens

    def done(self, usage_tokens: int | None = None) -> None:
        tokens = usage_tokens if usage_tokens is not None else self.num_tokens
        if self.num_chunks == 0:
            self.failed(RuntimeError("the stream ended without a token"))
            return
        now = time.perf_counter()
        # Per token, as `vllm bench serve` computes TPOT: a server that sends two tokens in
        # one chunk shows one long ITL gap where its tokens came no slower.
        if tokens > 1:
            self._event("TPOT", (now - self.first) / (tokens - 1))
        self._event("E2E", now - self.start, tokens)
        TALLY.tokens[self.name] += tokens
        TALLY.requests[self.name] += 1

    def failed(self, exception: Exception) -> None:
        self._event("E2E", time.perf_counter() - self.start, self.num_tokens, exception)


def served_model(options, host: str | None) -> str:
    """--model, or the first model the router's /v1/models lists."""
    if options.model:
        return options.model
    if not host:
        raise ValueError("give --model, or -H with the router's REST address to ask it")
    return requests.get(f"{host}/v1/models", timeout=30).json()["data"][0]["id"]


class StreamError(Exception):
    """The server answered with an error: an HTTP status, an error event, a gRPC status."""


class CleaveUser(User):
    """Shared loop: take the workload's next job, wait for its time, send it."""

    abstract = True
    _numbers = itertools.count()

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.options = options
        self.workload = make_workload(options, next(self._numbers), REPLAY)

    @task
    def send(self) -> None:
        job = self.workload.next_job()
        if job is None:  # the trace is over: the first user to see it ends the run
            if not REPLAY.finished:
                REPLAY.finished = True
                gevent.spawn(self.environment.runner.quit)
            # Idle between tasks, where the stopping runner ends a user at once.
            self.wait_time = lambda: 3600.0
            return
        delay = job.not_before - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)  # the trace's arrival time, not a settling pause
        timer = StreamTimer(self.environment, self.stat_name())
        try:
            text, usage_tokens = self.stream(job, timer)
        except (StreamError, requests.RequestException, grpc.RpcError, ValueError) as exc:
            timer.failed(exc)
            if isinstance(self.workload, ChatWorkload):
                self.workload.forget_turn()
            return
        timer.done(usage_tokens)
        self.workload.record_reply(text)

    def stat_name(self) -> str:
        return self.options.shape

    def stream(self, job: Job, timer: StreamTimer) -> tuple[str, int | None]:
        """Send job, call timer.chunk per streamed chunk; return the text and, when the
        server reports it, the number of output tokens."""
        raise NotImplementedError


class OpenAIStreamUser(CleaveUser):
    """POST /v1/completions (token prompts) or /v1/chat/completions (chat), stream=true,
    with usage in the final chunk."""

    def on_start(self) -> None:
        super().on_start()
        self.session = requests.Session()
        self.model = served_model(self.options, self.host)

    def stream(self, job: Job, timer: StreamTimer) -> tuple[str, int | None]:
        body = {"model": self.model, "max_tokens": job.max_tokens, "temperature": self.options.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        chat = job.messages is not None
        if chat:
            body["messages"] = job.messages
        else:
            body["prompt"] = job.prompt_ids
        path = "/v1/chat/completions" if chat else "/v1/completions"
        text: list[str] = []
        usage_tokens = None
        with self.session.post(f"{self.host}{path}", json=body, stream=True, timeout=300) as response:
            if response.status_code != 200:
                raise StreamError(f"HTTP {response.status_code}: {response.text[:300]}")
            for line in response.iter_lines(chunk_size=None):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise StreamError(f"error event: {event['error'].get('message')}")
                if event.get("usage"):
                    usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = choice["delta"].get("content") if chat else choice.get("text")
                    if piece:
                        text.append(piece)
                    # A completion chunk is a token even with no text (vLLM streams a token
                    # that ends inside a character so), as `vllm bench serve` counts it; a
                    # chat chunk only with content, as vLLM's first carries just the role.
                    if piece or not chat:
                        timer.chunk(1)
        return "".join(text), usage_tokens


class GrpcGenerateUser(CleaveUser):
    """cleave.v1.Generate, one stream per request; tokens counted from the items."""

    def on_start(self) -> None:
        super().on_start()
        self.model = served_model(self.options, self.host)
        self.channel = grpc.insecure_channel(self.options.grpc_host)
        self.stub = generate_pb2_grpc.GenerateStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def stat_name(self) -> str:
        return f"grpc/{self.options.shape}"

    def stream(self, job: Job, timer: StreamTimer) -> tuple[str, int | None]:
        params = common_pb2.SamplingParams(temperature=self.options.temperature, max_tokens=job.max_tokens,
                                           ignore_eos=True)
        if job.messages is not None:
            messages = [generate_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in job.messages]
            request = generate_pb2.GenerateRequest(model=self.model, params=params,
                                                   messages=generate_pb2.ChatMessages(messages=messages))
        else:
            request = generate_pb2.GenerateRequest(model=self.model, params=params,
                                                   prompt_token_ids=generate_pb2.TokenIds(ids=job.prompt_ids))
        text: list[str] = []
        for item in self.stub.Generate(request, timeout=300):
            if item.token_ids:
                timer.chunk(len(item.token_ids))
            text.append(item.text)
        return "".join(text), None


class StepRampShape(LoadTestShape):
    """--load-shape step: add --step-users every --step-seconds up to -u; ramp: grow
    linearly to -u over --ramp-seconds; both then hold until -t (default 60 s) and stop."""

    use_common_options = True

    def tick(self):
        options = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        if elapsed >= (options.run_time or 60):
            return None
        max_users = options.num_users or 1
        if options.load_shape == "step":
            users = min(max_users, options.step_users * (1 + int(elapsed // options.step_seconds)))
        else:
            users = min(max_users, max(1, math.ceil(max_users * elapsed / options.ramp_seconds)))
        return users, options.spawn_rate or max_users

