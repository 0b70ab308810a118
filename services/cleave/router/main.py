"""``cleave serve``: one process with the OpenAI-compatible server, the gRPC ``Generate``
service and the engine.

Flags, ``CLEAVE_*`` environment variables and Helm values share the field names of
``ServerConfig`` and ``EngineConfig``. SIGTERM drains: both servers stop accepting,
in-flight requests (streams included) finish, then the engine shuts down."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Sequence

from cleave.common import config as typed_config
from cleave.common import logging as cleave_logging
from cleave.common.startup import prepare_to_serve
from cleave.engine.config import EngineConfig
from cleave.modelzoo.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    from cleave.common.grpc_server import ServiceServer
    from cleave.engine.outputs import EngineClient
    from cleave.router.metrics import RouterMetrics
    from cleave.router.serving import TokenizerLike

GRPC_DISABLED = -1


@dataclass(slots=True)
class ServerConfig:
    """The serving side of ``cleave serve``: REST (HTTP) and gRPC."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "a model-zoo name or a Hugging Face model folder"})
    served_model_name: str = field(default="", metadata={"help": "the name clients send as `model`; default: --model"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    grpc_port: int = field(
        default=50051, metadata={"help": "port of the gRPC Generate service; 0 picks a free one, -1 turns it off"}
    )
    instance_id: str = field(default="", metadata={"help": "x-cleave-instance header value; default: host-pid"})
    timeout_graceful_shutdown: int = field(
        default=30, metadata={"help": "seconds to let in-flight requests finish after SIGTERM"}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], not {self.port}")
        if not GRPC_DISABLED <= self.grpc_port < 65536:
            raise ValueError(f"grpc_port must be in [0, 65535], or -1 to turn gRPC off, not {self.grpc_port}")
        if self.grpc_port == self.port != 0:
            raise ValueError(f"grpc_port and port must differ, not both {self.port}")
        if self.timeout_graceful_shutdown < 0:
            raise ValueError("timeout_graceful_shutdown must be >= 0")
        if not self.served_model_name:
            self.served_model_name = self.model


def build_parser(prog: str = "cleave serve") -> argparse.ArgumentParser:
    # Both configs have ``model``; the server's (a name or a path) replaces the
    # engine's flag, and the engine then gets the resolved folder.
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, conflict_handler="resolve")
    typed_config.add_arguments(parser, EngineConfig)
    typed_config.add_arguments(parser, ServerConfig)
    return parser


def parse_configs(argv: Sequence[str] | None) -> tuple[ServerConfig, EngineConfig]:
    """Read both configs from one command line; bad values exit with a usage error."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        server = typed_config.from_namespace(ServerConfig, namespace)
        engine = typed_config.from_namespace(EngineConfig, namespace)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return server, dataclasses.replace(engine, model=server.model)


def resolve_model(name_or_path: str) -> Path:
    """The absolute model folder (served as ``root`` in /v1/models) for a zoo name or a
    path; zoo models are built on first use."""
    from cleave.modelzoo.registry import resolve

    return resolve(name_or_path).resolve()


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave serve``."""
    if command != "serve":
        raise SystemExit(f"cleave.router.main cannot run {command!r}")
    server_config, engine_config = parse_configs(argv)
    log = cleave_logging.setup("router")
    try:
        model_path = resolve_model(server_config.model)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        log.error("cannot resolve model", extra={"model": server_config.model, "error": str(exc)})
        return 2
    engine_config = dataclasses.replace(engine_config, model=str(model_path))
    return serve(server_config, engine_config)


@dataclass(eq=False)
class GrpcBeside:
    """The gRPC ``Generate`` service for the lifetime of a REST app over the same engine:
    ``services`` goes to ``create_app`` (started after the engine, drained before the engine
    stops); ``begin_drain()`` starts the drain as soon as the HTTP server begins its own, so
    both stop accepting together."""

    config: ServerConfig
    engine: EngineClient
    tokenizer: TokenizerLike
    instance_id: str
    metrics: RouterMetrics
    server: ServiceServer | None = None
    _drain: asyncio.Future | None = None

    @asynccontextmanager
    async def services(self) -> AsyncIterator[None]:
        config = self.config
        if config.grpc_port == GRPC_DISABLED:
            yield
            return
        from cleave.router.grpc_api import start_grpc

        try:
            self.server = await start_grpc(
                config.host, config.grpc_port, self.engine, self.tokenizer, config.served_model_name, self.metrics,
                instance_id=self.instance_id, drain_grace=config.timeout_graceful_shutdown,
            )
        except RuntimeError as exc:  # grpc cannot bind the port
            logging.getLogger("cleave.router").error(
                "cannot serve gRPC; pick another --grpc-port, or -1 to turn it off",
                extra={"address": f"{config.host}:{config.grpc_port}", "error": str(exc)},
            )
            raise
        try:
            yield
        finally:
            await self.server.drain()

    def begin_drain(self) -> None:
        if self.server is not None and self._drain is None:
            self._drain = asyncio.ensure_future(self.server.drain())


def serve(server_config: ServerConfig, engine_config: EngineConfig) -> int:
    """Load the model, then serve until SIGTERM or SIGINT."""
    import uvicorn

    from cleave.engine.async_engine import AsyncLLMEngine
    from cleave.models.tokenizer import Tokenizer
    from cleave.router.app import create_app, default_instance_id
    from cleave.router.metrics import RouterMetrics

    log = cleave_logging.setup("router")
    tokenizer = Tokenizer.from_pretrained(engine_config.model)
    engine = AsyncLLMEngine(engine_config)
    instance_id = server_config.instance_id or default_instance_id()
    metrics = RouterMetrics()
    grpc = GrpcBeside(server_config, engine, tokenizer, instance_id, metrics)
    app = create_app(
        engine,
        tokenizer,
        server_config.served_model_name,
        engine_config.model,
        instance_id=instance_id,
        start_engine=True,
        metrics=metrics,
        services=grpc.services,
    )

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            grpc.begin_drain()
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(
            app,
            host=server_config.host,
            port=server_config.port,
            log_config=None,  # keep our JSON logs
            access_log=False,
            timeout_graceful_shutdown=server_config.timeout_graceful_shutdown,
        )
    )
    log.info(
        "serving",
        extra={
            "model": server_config.served_model_name,
            "root": engine_config.model,
            "url": f"http://{server_config.host}:{server_config.port}/v1",
        },
    )
    prepare_to_serve()
    # uvicorn drains on SIGTERM/SIGINT (gRPC alongside), runs the lifespan shutdown (the
    # gRPC server's end, then the engine's), then re-raises the signal, so a signalled
    # server exits as signalled.
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(run_command("serve", sys.argv[1:]))
