"""What both generation endpoints share: model and prompt checks, token budgets,
starting a ``Generation``, and the server-sent-events response."""

from __future__ import annotations

import json
import logging
import random
from typing import Any, AsyncIterator, Mapping, Protocol, Sequence

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from cleave.engine.outputs import EngineClient, ServiceUnavailableError
from cleave.engine.sampling_params import SamplingParams
from cleave.router.errors import APIError, internal_error, model_not_found
from cleave.events.lifecycle import events_of
from cleave.router.generation import Generation
from cleave.router.metrics import RouterMetrics
from cleave.router.protocol.common import PromptTokensDetails, SamplingRequest, UsageInfo

logger = logging.getLogger("cleave.router")


class TokenizerLike(Protocol):
    """The part of ``cleave.models.tokenizer.Tokenizer`` the front end uses."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools=None) -> str: ...

    @property
    def vocab_size(self) -> int: ...


def engine_is_healthy(engine: EngineClient) -> bool:
    return bool(engine.is_running)


def engine_unavailable() -> APIError:
    return APIError(503, "The engine is not running; try again later.", code="engine_unavailable")


def service_unavailable(exc: ServiceUnavailableError) -> APIError:
    return APIError(503, str(exc), code="service_unavailable")


def mid_stream_error(exc: Exception) -> APIError:
    """What a client is told when a generation fails after its response has begun."""
    return service_unavailable(exc) if isinstance(exc, ServiceUnavailableError) else internal_error()


class SSEResponse(StreamingResponse):
    """Server-sent events whose body iterator is always closed, so the engine request
    behind it is aborted however the response ends (client gone, server stopping)."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, headers={"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


# The roles of the workers a disaggregated request runs on; each gets a response header
# (and gRPC metadata key) naming the instance, when the engine reports it.
SERVED_BY_ROLES = ("prefill", "decode")


def served_by_headers(served_by: Mapping[str, str]) -> dict[str, str]:
    """``x-cleave-prefill-instance`` / ``x-cleave-decode-instance`` for the roles present."""
    return {f"x-cleave-{role}-instance": served_by[role] for role in SERVED_BY_ROLES if served_by.get(role)}


def sse_event(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_DONE = sse_event("[DONE]")


class TextEvents:
    """The SSE events of one stream's plain text chunks (no logprobs, no finish reason),
    byte for byte ``sse_event`` of the chunk model's dump, without building and dumping a
    model for each token (at 50 streams that was a fifth of the event loop's time per
    token): the chunk is rendered once, by its model, with ``MARK`` for its text, and per
    chunk only the text is encoded."""

    MARK = "cleave-text-mark"

    def __init__(self, chunk: dict[str, Any]) -> None:
        # The text is the chunk's last string (logprobs, finish_reason and usage follow, null).
        self._head, self._tail = sse_event(chunk).rsplit(json.dumps(self.MARK), 1)

    def event(self, text: str) -> str:
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail

# Seeded once from the OS: ids of processes started together still differ.
_request_ids = random.Random()

# OpenAI's stand-in for a log-probability of minus infinity; JSON has no infinities.
MIN_LOGPROB = -9999.0


def safe_logprob(logprob: float | None) -> float:
    if logprob is None or logprob != logprob or logprob < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(logprob)


class OpenAIServing:
    """Base of the completion and chat handlers."""

    request_id_prefix = "cmpl"
    endpoint = "completions"

    def __init__(
        self, engine: EngineClient, tokenizer: TokenizerLike, served_model_name: str, metrics: RouterMetrics
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.metrics = metrics

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def new_request_id(self) -> str:
        # Not uuid4: its os.urandom call per request showed in the profile of a burst,
        # and an id needs to be unique, not secret.
        return f"{self.request_id_prefix}-{_request_ids.getrandbits(128):032x}"

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise model_not_found(model)

    def check_token_ids(self, token_ids: Sequence[int], param: str) -> None:
        vocab_size = self.tokenizer.vocab_size
        for i, token_id in enumerate(token_ids):
            if not 0 <= token_id < vocab_size:
                raise APIError(
                    400, f"{param}[{i}] = {token_id} is not a token id: the vocabulary has {vocab_size}", param=param
                )

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None, default: int | None, param: str) -> int:
        """The output budget: the request's, or the default capped to what fits."""
        if num_prompt_tokens == 0:
            raise APIError(400, f"{param} must not be empty", param=param)
        room = self.max_model_len - num_prompt_tokens
        if room <= 0:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{num_prompt_tokens} tokens, leaving no room for a completion. Please shorten the prompt.",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt, {requested} in the "
                f"completion). Please reduce the length of the prompt or the completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    def admit(self, request: SamplingRequest, request_id: str) -> tuple[list[int], int]:
        """Check a request under its id (``prepare``, stop token ids), emitting ``arrived``
        and, when it is refused, ``rejected``; returns its prompt token ids and output budget."""
        events = events_of(self.engine)
        model = request.model or self.served_model_name
        try:
            prompt_ids, max_tokens = self.prepare(request)
            if request.stop_token_ids:
                self.check_token_ids(request.stop_token_ids, "stop_token_ids")
        except APIError as exc:
            events.arrived(request_id, None, model)
            events.rejected(request_id, exc)
            raise
        events.arrived(request_id, len(prompt_ids), model)
        return prompt_ids, max_tokens

    async def start(
        self, request: SamplingRequest, request_id: str, prompt_ids: list[int], max_tokens: int, logprobs: bool
    ) -> Generation:
        """Submit to the engine; returns once the first token is out (or the engine refused)."""
        if request.stop_token_ids:
            self.check_token_ids(request.stop_token_ids, "stop_token_ids")
        params: SamplingParams = request.to_sampling_params(max_tokens, logprobs)
        generation = Generation(
            self.engine, self.tokenizer, request_id, prompt_ids, params, request.stop_strings, self.metrics.track()
        )
        try:
            await generation.start()
        except APIError as exc:
            self.metrics.count_rejection(exc)
            raise
        except ServiceUnavailableError as exc:
            raise self.metrics.count_rejection(service_unavailable(exc)) from None
        except Exception:
            if not engine_is_healthy(self.engine):
                raise self.metrics.count_rejection(engine_unavailable()) from None
            raise
        return generation

    def usage(self, generation: Generation) -> UsageInfo:
        u = generation.usage
        return UsageInfo(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
        )

    def response_headers(self, generation: Generation) -> dict[str, str]:
        """Headers of a started generation's response: its id and the workers serving it."""
        return {"x-request-id": generation.request_id, **served_by_headers(generation.served_by)}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def count(self, outcome: str) -> None:
        self.metrics.requests.labels(self.endpoint, outcome).inc()

    async def run_to_end(self, generation: Generation, raw_request: Request) -> tuple[str, list[int], list[float]]:
        """Drain a generation for a non-streaming response; a client that hangs up
        meanwhile aborts it."""
        text, token_ids, logprobs = [], [], []
        disconnected = False

        async def watch_disconnect(scope: anyio.CancelScope) -> None:
            nonlocal disconnected
            while (await raw_request.receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            scope.cancel()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch_disconnect, tasks.cancel_scope)
                async for delta in generation.stream():
                    text.append(delta.text)
                    token_ids.extend(delta.token_ids)
                    logprobs.extend(delta.logprobs)
                tasks.cancel_scope.cancel()
        except Exception:
            logger.exception("generation failed", extra={"request_id": generation.request_id})
            raise internal_error() from None
        finally:
            await generation.close()
        self.count("cancelled" if disconnected else "success")
        return "".join(text), token_ids, logprobs

    async def guard_stream(self, generation: Generation, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """Count the stream's outcome and release the engine request however it ends;
        an engine failure after the headers went out becomes an error event, as
        OpenAI sends it, then ``[DONE]``."""
        outcome = "cancelled"
        try:
            async for event in events:
                yield event
            outcome = "success"
        except Exception as exc:
            logger.exception("generation failed mid-stream", extra={"request_id": generation.request_id})
            outcome = "server_error"
            yield sse_event(mid_stream_error(exc).to_dict())
            yield SSE_DONE
        finally:
            with anyio.CancelScope(shield=True):
                await events.aclose()
                await generation.close()
            self.count(outcome)
