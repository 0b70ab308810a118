"""Redis as its clients see it (cleave.common.redis_metrics): every round trip of a measured
client is timed once, a pipeline included, a timed-out command is counted as an error, and
a service registry serves the figures."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry

from cleave.common import redis_metrics
from cleave.common.metrics_http import MetricsHTTPServer


def samples() -> tuple[float, float]:
    registry = CollectorRegistry()
    redis_metrics.register(registry)
    return (registry.get_sample_value("cleave_redis_command_seconds_count") or 0.0,
            registry.get_sample_value("cleave_redis_command_errors_total") or 0.0)


def test_round_trips_are_timed_once_each(redis_url):
    async def run() -> None:
        client = redis_metrics.async_client(redis_url, socket_timeout=5)
        try:
            await client.ping()  # the connection's handshake is sent before: no AUTH/HELLO here
            count, errors = samples()
            await client.set("cleave:test:redis-metrics", "1")
            async with client.pipeline(transaction=False) as pipe:
                pipe.get("cleave:test:redis-metrics").incr("cleave:test:redis-metrics").delete("cleave:test:redis-metrics")
                assert await pipe.execute() == [b"1", 2, 1]
            assert samples() == (count + 2, errors)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_command_that_times_out_is_an_error():
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def run() -> None:
            client = redis_metrics.async_client(url, socket_timeout=0.2, socket_connect_timeout=2)
            try:
                with pytest.raises(Exception, match="(?i)timeout"):
                    await client.get("k")
            finally:
                await client.aclose()

        count, errors = samples()
        asyncio.run(run())
        assert samples() == (count, errors + 1)


def test_every_service_registry_serves_redis_and_process_metrics():
    registry = CollectorRegistry()
    MetricsHTTPServer(registry)
    names = {family.name for family in registry.collect()}
    assert {"cleave_redis_command_seconds", "cleave_redis_command_errors", "process_cpu_seconds"} <= names
