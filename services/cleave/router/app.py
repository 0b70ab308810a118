"""The OpenAI-compatible HTTP front end, built around any ``EngineClient``.

Today the engine is in-process; in the disaggregated platform the same app fronts a
remote prefill/decode client, so nothing here reaches past the ``EngineClient`` seam."""

from __future__ import annotations

import inspect
import logging
import os
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY, CONTENT_TYPE_LATEST, generate_latest

from cleave.engine.outputs import EngineClient
from cleave.router.errors import APIError, install_handlers, internal_error, model_not_found
from cleave.router.metrics import RouterMetrics, endpoint_label, outcome_label
from cleave.router.protocol.chat import ChatCompletionRequest
from cleave.router.protocol.completion import CompletionRequest
from cleave.router.protocol.models import ModelCard, ModelList
from cleave.router.serving import TokenizerLike, engine_is_healthy, engine_unavailable
from cleave.router.serving_chat import OpenAIServingChat
from cleave.router.serving_completion import OpenAIServingCompletion

logger = logging.getLogger("cleave.router")

INSTANCE_HEADER = "x-cleave-instance"


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class InstanceHeaderMiddleware:
    """Names the serving instance on every response. Pure ASGI, because Starlette's
    ``BaseHTTPMiddleware`` buffers and detaches streaming bodies from disconnects."""

    def __init__(self, app, instance_id: str) -> None:
        self.app = app
        self.header = (INSTANCE_HEADER.encode(), instance_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


async def _maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


def create_app(
    engine: EngineClient,
    tokenizer: TokenizerLike,
    served_model_name: str,
    model_root: str,
    *,
    instance_id: str | None = None,
    start_engine: bool = False,
    metrics: RouterMetrics | None = None,
    services: Callable[[], AsyncContextManager[Any]] | None = None,
) -> FastAPI:
    """Build the app. With ``start_engine`` the app's lifespan calls the engine's
    ``start()`` on startup and ``shutdown()`` after the server has drained. ``services``
    (an async context manager factory) runs inside that, for what shares the app's
    event loop: a gRPC server, the registry record."""
    metrics = metrics or RouterMetrics()
    instance_id = instance_id or default_instance_id()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if start_engine:
            await _maybe_await(engine.start())
        try:
            if services is None:
                yield
            else:
                async with services():
                    yield
        finally:
            if start_engine:
                await _maybe_await(engine.shutdown())

    app = FastAPI(title="cleave", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.metrics = metrics
    app.state.instance_id = instance_id
    app.add_middleware(InstanceHeaderMiddleware, instance_id=instance_id)

    def on_error(request: Request, status_code: int) -> None:
        metrics.requests.labels(endpoint_label(request.url.path), outcome_label(status_code)).inc()

    install_handlers(app, on_error)
    completions = OpenAIServingCompletion(engine, tokenizer, served_model_name, metrics)
    chat = OpenAIServingChat(engine, tokenizer, served_model_name, metrics)

    def model_card() -> ModelCard:
        return ModelCard(id=served_model_name, root=model_root, max_model_len=engine.max_model_len)

    async def guarded(call):
        try:
            return await call
        except APIError:
            raise
        except Exception:
            logger.exception("request failed")
            raise internal_error() from None

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw_request: Request):
        return await guarded(completions.create_completion(request, raw_request))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
        return await guarded(chat.create_chat_completion(request, raw_request))

    @app.get("/v1/models")
    async def list_models():
        metrics.requests.labels("models", "success").inc()
        return JSONResponse(ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str):
        if model != served_model_name:
            raise model_not_found(model)
        metrics.requests.labels("models", "success").inc()
        return JSONResponse(model_card().model_dump())

    @app.get("/health")
    async def health():
        if not engine_is_healthy(engine):
            raise engine_unavailable()
        return JSONResponse({"status": "ok", "instance": instance_id, "model": served_model_name})

    @app.get("/metrics")
    async def prometheus_metrics():
        # The default registry carries process metrics and whatever the engine
        # registers there; the router's own series live in the app's registry.
        body = generate_latest(metrics.registry) + generate_latest(REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
