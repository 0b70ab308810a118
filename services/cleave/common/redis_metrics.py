"""Redis as its clients see it. Redis runs without an exporter, so each service measures
its own commands: ``cleave_redis_command_seconds`` (from sending a command, or a pipeline,
to its first reply) and ``cleave_redis_command_errors_total`` (commands that failed on
the connection: timeouts, resets). A Redis that answers slowly shows here in every service
at once, which is how root-cause analysis tells it apart from a slow service.

Clients made by :func:`async_client` are measured. The metrics live in this process's
default registry (which the router serves) and any service registry given to :func:`register`."""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Histogram

COMMAND_SECONDS = Histogram(
    "cleave_redis_command_seconds", "Redis round trip seen by this client: a command or pipeline sent to its first reply",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
COMMAND_ERRORS = Counter(
    "cleave_redis_command_errors", "Redis commands that failed on the connection (timeout, reset)",
)


def register(registry: CollectorRegistry) -> None:
    """Serve the Redis client metrics from ``registry`` too."""
    registry.register(COMMAND_SECONDS)
    registry.register(COMMAND_ERRORS)


class TimedConnection(aioredis.Connection):
    """A connection that times each round trip. A pipeline is sent at once and its replies
    read one after another: only the first reply is timed, the round trip itself."""

    _sent_at: float | None = None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        await super().send_packed_command(command, check_health)
        self._sent_at = time.perf_counter()

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            response = await super().read_response(*args, **kwargs)
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError):
            COMMAND_ERRORS.inc()
            self._sent_at = None
            raise
        if self._sent_at is not None:
            COMMAND_SECONDS.observe(time.perf_counter() - self._sent_at)
            self._sent_at = None
        return response


def async_client(url: str, **options: Any) -> aioredis.Redis:
    """An asyncio Redis client of ``url`` whose commands are measured."""
    return aioredis.Redis.from_url(url, connection_class=TimedConnection, **options)
