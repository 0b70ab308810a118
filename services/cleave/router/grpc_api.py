"""The router's public gRPC front door: ``cleave.v1.Generate``, the streaming twin of the
REST endpoints.

A ``GenerateRequest`` becomes the REST request model (``CompletionRequest`` for a prompt or
token ids, ``ChatCompletionRequest`` for messages) and runs through the same checks and the
same ``Generation``, so both doors accept the same parameters and refuse bad ones with the
same messages. Errors map onto status codes as the REST statuses do::

    400 -> INVALID_ARGUMENT, 404 -> NOT_FOUND, 429 -> RESOURCE_EXHAUSTED, 503 -> UNAVAILABLE,
    anything else -> INTERNAL (generic message; the details go to the log)
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

import grpc
import numpy as np
from pydantic import ValidationError

from cleave.common.grpc_server import DEFAULT_DRAIN_GRACE_SECONDS, ServiceServer
from cleave.common.wire import FINISH_REASONS
from cleave.engine.outputs import EngineClient
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import generate_pb2 as pb
from cleave.protogen.cleave.v1 import generate_pb2_grpc as pb_grpc
from cleave.router.app import INSTANCE_HEADER, default_instance_id
from cleave.router.errors import APIError, internal_error, validation_error
from cleave.router.generation import Generation, TextDelta
from cleave.router.metrics import RouterMetrics, outcome_label
from cleave.router.protocol.chat import ChatCompletionRequest
from cleave.router.protocol.common import SamplingRequest
from cleave.router.protocol.completion import CompletionRequest
from cleave.router.serving import OpenAIServing, TokenizerLike, mid_stream_error, served_by_headers
from cleave.router.serving_chat import OpenAIServingChat
from cleave.router.serving_completion import OpenAIServingCompletion

logger = logging.getLogger("cleave.router")

GENERATE_SERVICE = pb.DESCRIPTOR.services_by_name["Generate"].full_name
ENDPOINT = "grpc_generate"
# Trailing metadata of a failed call: the REST envelope's ``code`` and ``param``.
ERROR_CODE_KEY = "x-cleave-error-code"
ERROR_PARAM_KEY = "x-cleave-error-param"

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def status_of(error: APIError) -> tuple[grpc.StatusCode, APIError]:
    """The status code for an API error, and the error to report (a generic one for
    statuses without a gRPC twin)."""
    code = STATUS_CODES.get(error.status_code)
    return (code, error) if code is not None else (grpc.StatusCode.INTERNAL, internal_error())


def _float32(value: float) -> float:
    """The decimal a float32 field was set from (0.7, not 0.699999988), as REST receives it."""
    return float(str(np.float32(value)))


def sampling_fields(request: pb.GenerateRequest) -> dict[str, Any]:
    """The REST request fields a ``GenerateRequest`` sets; unset optional ones are left out,
    so they take the REST defaults."""
    params = request.params
    fields: dict[str, Any] = {"top_k": params.top_k, "ignore_eos": params.ignore_eos}
    for name in ("temperature", "top_p"):
        if params.HasField(name):
            fields[name] = _float32(getattr(params, name))
    for name in ("max_tokens", "seed"):
        if params.HasField(name):
            fields[name] = getattr(params, name)
    if params.stop_token_ids:
        fields["stop_token_ids"] = list(params.stop_token_ids)
    if request.stop:
        fields["stop"] = list(request.stop)
    if request.model:
        fields["model"] = request.model
    return fields


class GenerateServicer(pb_grpc.GenerateServicer):
    """``cleave.v1.Generate`` over any ``EngineClient``, with REST's checks and metrics."""

    def __init__(
        self,
        engine: EngineClient,
        tokenizer: TokenizerLike,
        served_model_name: str,
        metrics: RouterMetrics,
        *,
        instance_id: str | None = None,
    ) -> None:
        self.completions = OpenAIServingCompletion(engine, tokenizer, served_model_name, metrics)
        self.chat = OpenAIServingChat(engine, tokenizer, served_model_name, metrics)
        self.metrics = metrics
        self.instance_id = instance_id or default_instance_id()

    def to_api_request(self, request: pb.GenerateRequest) -> tuple[OpenAIServing, SamplingRequest]:
        """The REST request model for a ``GenerateRequest``, and the handler that serves it.
        Raises ``APIError`` or pydantic's ``ValidationError``."""
        kind = request.WhichOneof("input")
        fields = sampling_fields(request)
        logprobs = request.params.logprobs
        if kind == "messages":
            messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
            return self.chat, ChatCompletionRequest.model_validate({**fields, "messages": messages, "logprobs": logprobs})
        if kind == "prompt":
            prompt: str | list[int] = request.prompt
        elif kind == "prompt_token_ids":
            prompt = list(request.prompt_token_ids.ids)
        else:
            raise APIError(
                400, "one of prompt, prompt_token_ids or messages is required", param="input",
                code="missing_required_parameter",
            )
        return self.completions, CompletionRequest.model_validate(
            {**fields, "prompt": prompt, "logprobs": 1 if logprobs else None}
        )

    async def start(self, request: pb.GenerateRequest) -> Generation:
        """Check the request and start it; returns once the first output is in."""
        try:
            serving, api_request = self.to_api_request(request)
        except ValidationError as exc:
            raise validation_error(exc) from None
        request_id = request.request_id or serving.new_request_id()
        prompt_ids, max_tokens = serving.admit(api_request, request_id)
        return await serving.start(api_request, request_id, prompt_ids, max_tokens, logprobs=request.params.logprobs)

    def response(self, generation: Generation, delta: TextDelta, logprobs: bool) -> pb.GenerateResponse:
        item = pb.GenerateResponse(
            request_id=generation.request_id,
            token_ids=delta.token_ids,
            text=delta.text,
            logprobs=delta.logprobs if logprobs else (),
            finish_reason=FINISH_REASONS[delta.finish_reason],
        )
        if delta.finish_reason is not None:
            u = generation.usage
            item.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=u.prompt_tokens,
                    completion_tokens=u.completion_tokens,
                    total_tokens=u.prompt_tokens + u.completion_tokens,
                    cached_tokens=u.cached_tokens,
                )
            )
        return item

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        # A client that cancels (or whose deadline passes) cancels this handler: the
        # ``finally`` closes the generation, which aborts the engine request.
        outcome = "cancelled"
        generation: Generation | None = None
        error: APIError | None = None
        try:
            generation = await self.start(request)
            await context.send_initial_metadata(
                ((INSTANCE_HEADER, self.instance_id), *served_by_headers(generation.served_by).items())
            )
            async with aclosing(generation.stream()) as deltas:
                async for delta in deltas:
                    if delta.token_ids or delta.text or delta.finish_reason is not None:
                        yield self.response(generation, delta, request.params.logprobs)
            outcome = "success"
        except APIError as exc:
            outcome, error = outcome_label(exc.status_code), exc
        except Exception as exc:
            request_id = generation.request_id if generation is not None else request.request_id
            logger.exception("grpc generate failed", extra={"request_id": request_id})
            outcome, error = "server_error", mid_stream_error(exc)
        finally:
            if generation is not None:
                await generation.close()
            self.metrics.requests.labels(ENDPOINT, outcome).inc()
        if error is not None:
            code, error = status_of(error)
            trailing = [(INSTANCE_HEADER, self.instance_id)]
            trailing += [(key, value) for key, value in ((ERROR_CODE_KEY, error.code), (ERROR_PARAM_KEY, error.param)) if value]
            await context.abort(code, error.message, trailing_metadata=tuple(trailing))


def add_generate_service(
    server: grpc.aio.Server,
    engine: EngineClient,
    tokenizer: TokenizerLike,
    served_model_name: str,
    metrics: RouterMetrics,
    instance_id: str | None = None,
) -> GenerateServicer:
    """Add the ``Generate`` service to a server built with ``GENERATE_SERVICE`` among its
    service names (``ServiceServer``, for health and reflection), before it starts."""
    servicer = GenerateServicer(engine, tokenizer, served_model_name, metrics, instance_id=instance_id)
    pb_grpc.add_GenerateServicer_to_server(servicer, server)
    return servicer


async def start_grpc(
    host: str,
    port: int,
    engine: EngineClient,
    tokenizer: TokenizerLike,
    served_model_name: str,
    metrics: RouterMetrics,
    *,
    instance_id: str | None = None,
    drain_grace: float = DEFAULT_DRAIN_GRACE_SECONDS,
    advertise: str = "",
) -> ServiceServer:
    """Serve ``Generate`` (with health and reflection) on ``host:port`` from the running
    event loop, beside a REST app over the same engine (pass the app's metrics and
    instance id). Port 0 binds a free port (``.port`` afterwards); stop it with ``drain()``."""
    server = ServiceServer(host, port, [GENERATE_SERVICE], drain_grace=drain_grace, advertise=advertise)
    add_generate_service(server.server, engine, tokenizer, served_model_name, metrics, instance_id)
    await server.start()
    return server
