"""``cleave kvstore`` / ``python -m cleave.kvstore``: run one KV store until SIGTERM or
SIGINT, which drain it (see cleave.common.grpc_server). Flags and ``CLEAVE_*``
environment variables are the fields of ``KVStoreConfig``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from cleave.common import config as typed_config
from cleave.common import logging as cleave_logging
from cleave.kvstore.config import KVStoreConfig
from cleave.common.startup import prepare_to_serve, run_service


def parse_config(argv: Sequence[str] | None, prog: str = "cleave kvstore") -> KVStoreConfig:
    """Read the config from flags and environment; bad values exit with a usage error."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    typed_config.add_arguments(parser, KVStoreConfig)
    namespace = parser.parse_args(argv)
    try:
        return typed_config.from_namespace(KVStoreConfig, namespace)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


async def serve(config: KVStoreConfig) -> int:
    from cleave.kvstore.service import KVStoreServer

    server = KVStoreServer(config)
    await server.start()
    prepare_to_serve()
    server.grpc.install_signal_handlers()
    await server.grpc.wait_for_termination()
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave kvstore``."""
    if command != "kvstore":
        raise SystemExit(f"cleave.kvstore.main cannot run {command!r}")
    config = parse_config(argv)
    log = cleave_logging.setup("kvstore")
    import redis

    try:
        return run_service(serve(config))
    except (OSError, RuntimeError, redis.RedisError) as exc:  # a taken port, an unreachable Redis
        log.error("kvstore failed to start", extra={"error": str(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(run_command("kvstore", sys.argv[1:]))
