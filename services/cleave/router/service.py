"""``cleave router``: the platform's front door. OpenAI REST and gRPC ``Generate`` over
prefill and decode workers found in the Redis registry (``RemoteEngineClient``).

It tokenizes, routes each request through the configured pipelines, relays the stream,
resumes on another decode worker when one dies, and registers itself as role
``router``. ``GET /admin/instances`` lists every registered instance by role, with
health and load. SIGTERM drains: HTTP and gRPC stop accepting, in-flight requests
finish, the record is removed."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from cleave.common import config as typed_config
from cleave.common import logging as cleave_logging
from cleave.common.registry import DEFAULT_REDIS_URL
from cleave.common.startup import prepare_to_serve
from cleave.events.schema import DEFAULT_TOPIC
from cleave.modelzoo.registry import DEFAULT_MODEL
from cleave.router.plugins import parse_pipeline

ROLE = "router"


@dataclass(slots=True)
class RouterConfig:
    """The router service (disaggregated serving)."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "the model the workers serve: a model-zoo name or folder, as given to them"})
    served_model_name: str = field(default="", metadata={"help": "the name clients send as `model`; default: --model"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (HTTP and gRPC)"})
    port: int = field(default=8000, metadata={"help": "HTTP port (OpenAI REST, /metrics, /admin/instances)"})
    grpc_port: int = field(default=50051, metadata={"help": "gRPC port of the public Generate service; 0 picks a free one"})
    advertise_address: str = field(default="", metadata={"help": "host:port of the gRPC server registered for others; default: host:grpc_port"})
    redis_url: str = field(default=DEFAULT_REDIS_URL, metadata={"help": "Redis of the registry and the KV index"})
    instance_id: str = field(default="", metadata={"help": "registry id and x-cleave-instance; default: router-<hostname>-<pid>"})
    prefill_routing: str = field(
        default="kv-aware,least-loaded",
        metadata={"help": "prefill pipeline: round-robin, or scorers with weights (kv-aware=2,least-loaded)"},
    )
    decode_routing: str = field(default="least-loaded", metadata={"help": "decode pipeline, same form as prefill_routing"})
    prefix_cache_blocks: int = field(default=100_000, metadata={"help": "blocks per worker the kv-aware scorer remembers"})
    max_attempts: int = field(default=3, metadata={"help": "workers tried per stage before a request fails with 503"})
    local_prefill_tokens: int = field(default=0, metadata={
        "help": "a prompt of at most this many tokens goes straight to a decode worker, which prefills it itself "
                "(conditional disaggregation); 0: every prompt goes to a prefill worker"})
    prefill_timeout_seconds: float = field(default=120.0, metadata={"help": "deadline of one prefill call"})
    decode_timeout_seconds: float = field(default=600.0, metadata={"help": "deadline of one decode stream"})
    refresh_seconds: float = field(default=0.5, metadata={"help": "how often the registry is re-read"})
    health_check_seconds: float = field(default=2.0, metadata={"help": "how often every worker's gRPC health is checked"})
    registry_ttl_seconds: float = field(default=5.0, metadata={"help": "registration expiry without heartbeats"})
    timeout_graceful_shutdown: int = field(default=30, metadata={"help": "seconds in-flight requests get after SIGTERM"})
    ttft_target_seconds: float = field(default=2.0, metadata={"help": "TTFT target of the SLO (docs/metrics.md), drawn on /dashboard"})
    tpot_target_seconds: float = field(default=0.2, metadata={"help": "TPOT (inter-token gap) target of the SLO (docs/metrics.md), drawn on /dashboard"})
    events_bootstrap: str = field(default="", metadata={"help": "Kafka bootstrap servers (host:port,...) for request-lifecycle events (docs/events.md); empty: no events"})
    events_topic: str = field(default=DEFAULT_TOPIC, metadata={"help": "Kafka topic of the request-lifecycle events"})
    events_buffer_size: int = field(default=10_000, metadata={"help": "events held while the broker is slow or away; beyond, they are dropped and counted"})

    def __post_init__(self) -> None:
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], not {getattr(self, name)}")
        for name in ("prefill_timeout_seconds", "decode_timeout_seconds", "refresh_seconds",
                     "health_check_seconds", "registry_ttl_seconds", "ttft_target_seconds", "tpot_target_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        for name in ("max_attempts", "prefix_cache_blocks", "events_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.timeout_graceful_shutdown < 0:
            raise ValueError("timeout_graceful_shutdown must be >= 0")
        if self.local_prefill_tokens < 0:
            raise ValueError(f"local_prefill_tokens must be >= 0, not {self.local_prefill_tokens}")
        if not self.redis_url:
            raise ValueError("redis_url is required: the router finds its workers in the registry")
        for name in ("prefill_routing", "decode_routing"):
            try:
                parse_pipeline(getattr(self, name))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        if not self.served_model_name:
            self.served_model_name = self.model
        if not self.instance_id:
            self.instance_id = f"{ROLE}-{socket.gethostname()}-{os.getpid()}"
        if ":" in self.instance_id:
            raise ValueError(f"instance_id must not contain ':', got {self.instance_id!r}")


def context_length(model_path: Path) -> int:
    """The model's own context length, used only while no worker is registered."""
    try:
        return int(json.loads((model_path / "config.json").read_text())["max_position_embeddings"])
    except (OSError, KeyError, ValueError):
        return 2048


def build_app(config: RouterConfig, model_path: Path):
    """The router's FastAPI app; its lifespan starts the worker pool, the gRPC server and
    the registry record, and stops them in reverse."""
    from cleave.common import redis_metrics
    from cleave.common.registry import CLIENT_OPTIONS, AsyncRegistry, InstanceRecord
    from cleave.events.lifecycle import RequestEvents
    from cleave.events.publisher import EventPublisher
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.admin import add_prometheus_targets_route
    from cleave.router.app import create_app
    from cleave.router.dashboard import add_dashboard_routes
    from cleave.router.grpc_api import start_grpc
    from cleave.router.metrics import RouterMetrics
    from cleave.router.remote_engine import RemoteEngineClient, RemoteEngineConfig
    from cleave.router.workers import WorkerPool

    tokenizer = Tokenizer.from_pretrained(model_path)
    redis_client = redis_metrics.async_client(config.redis_url, **CLIENT_OPTIONS)
    pool = WorkerPool(redis_client, config.model, refresh_seconds=config.refresh_seconds,
                      health_seconds=config.health_check_seconds)
    metrics = RouterMetrics()
    publisher = (EventPublisher(config.events_bootstrap, config.events_topic, config.events_buffer_size,
                                metrics.registry) if config.events_bootstrap else None)
    engine = RemoteEngineClient(
        pool,
        parse_pipeline(config.prefill_routing, prefix_capacity=config.prefix_cache_blocks),
        parse_pipeline(config.decode_routing, prefix_capacity=config.prefix_cache_blocks),
        RemoteEngineConfig(config.max_attempts, config.prefill_timeout_seconds, config.decode_timeout_seconds,
                           context_length(model_path), config.local_prefill_tokens),
        metrics,
        events=RequestEvents(publisher, ROLE, config.instance_id),
    )
    state: dict = {}

    @asynccontextmanager
    async def services():
        grpc_server = await start_grpc(
            config.host, config.grpc_port, engine, tokenizer, config.served_model_name, metrics,
            instance_id=config.instance_id, drain_grace=config.timeout_graceful_shutdown,
            advertise=config.advertise_address,
        )
        state["grpc"] = grpc_server
        record = InstanceRecord(ROLE, config.instance_id, grpc_server.address, capabilities={
            "model": config.model, "served_model_name": config.served_model_name,
            "http": f"{config.host}:{config.port}", "prefill_routing": config.prefill_routing,
            "decode_routing": config.decode_routing, "local_prefill_tokens": config.local_prefill_tokens,
        })
        await grpc_server.register(AsyncRegistry(redis_client), record, config.registry_ttl_seconds)
        await pool.refresh()  # list ourselves from the first /admin/instances on
        try:
            yield
        finally:
            await grpc_server.drain()
            await redis_client.aclose()
            if publisher is not None:
                await asyncio.to_thread(publisher.close)

    app = create_app(engine, tokenizer, config.served_model_name, str(model_path), instance_id=config.instance_id,
                     start_engine=True, metrics=metrics, services=services)
    app.state.grpc = state

    @app.get("/admin/instances")
    async def list_instances():
        return {
            "router": config.instance_id,
            "routing": {"prefill": engine.prefill_pipeline.describe(), "decode": engine.decode_pipeline.describe()},
            **pool.snapshot(),
        }

    add_prometheus_targets_route(app, pool)
    add_dashboard_routes(app, pool, metrics, config)
    return app


def serve(config: RouterConfig, model_path: Path) -> int:
    import redis
    import uvicorn

    log = cleave_logging.setup(ROLE)
    try:
        redis.Redis.from_url(config.redis_url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        log.error("cannot reach Redis; start it (make up does) or pass --redis-url",
                  extra={"redis_url": config.redis_url, "error": str(exc)})
        return 1
    app = build_app(config, model_path)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # SIGTERM: deregister and stop taking gRPC calls as HTTP stops taking requests;
            # in-flight work of both finishes within the grace.
            if (grpc_server := app.state.grpc.get("grpc")) is not None:
                asyncio.ensure_future(grpc_server.drain())
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        timeout_graceful_shutdown=config.timeout_graceful_shutdown,
    ))
    log.info("routing", extra={
        "model": config.served_model_name, "url": f"http://{config.host}:{config.port}/v1",
        "prefill_routing": config.prefill_routing, "decode_routing": config.decode_routing,
        "instance_id": config.instance_id,
    })
    prepare_to_serve()
    server.run()
    return 0 if server.started else 1


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave router``."""
    if command != ROLE:
        raise SystemExit(f"cleave.router.service cannot run {command!r}")
    parser = argparse.ArgumentParser(prog="cleave router", description=__doc__)
    typed_config.add_arguments(parser, RouterConfig)
    try:
        config = typed_config.from_namespace(RouterConfig, parser.parse_args(argv))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    log = cleave_logging.setup(ROLE)
    from cleave.router.main import resolve_model

    try:
        model_path = resolve_model(config.model)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        log.error("cannot resolve model", extra={"model": config.model, "error": str(exc)})
        return 2
    return serve(config, model_path)


if __name__ == "__main__":
    sys.exit(run_command(ROLE, sys.argv[1:]))
