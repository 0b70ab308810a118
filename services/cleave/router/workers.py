"""The router's view of the worker pools: who is registered in Redis, whether each
answers its health check, what this router has in flight on each, and one gRPC
channel per address.

The registry is re-read every ``refresh_seconds`` (a dead worker's key expires within
its TTL, so it drops out within a few seconds); health checks run every
``health_seconds``, so that a draining worker (NOT_SERVING) stops getting requests
before it deregisters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import asyncio as aioredis

from cleave.common.grpc_server import channel_options
from cleave.common.registry import AsyncRegistry, InstanceRecord
from cleave.common.tasks import cancel_and_wait
from cleave.kvstore.index import lookup
from cleave.router.plugins import Candidate

log = logging.getLogger("cleave.router")

ROLES = ("prefill", "decode", "kvstore", "expert", "router")
HEALTH_SERVING = "SERVING"
HEALTH_UNKNOWN = "UNKNOWN"
UNREACHABLE_AFTER_MISSES = 2


class WorkerPool:
    def __init__(
        self,
        redis_client: aioredis.Redis,
        model: str,
        *,
        refresh_seconds: float = 0.5,
        health_seconds: float = 2.0,
        health_timeout: float = 2.0,
    ) -> None:
        self.redis = redis_client
        self.registry = AsyncRegistry(redis_client)
        self.model = model
        self.refresh_seconds = refresh_seconds
        self.health_seconds = health_seconds
        self.health_timeout = health_timeout
        self.records: dict[str, list[InstanceRecord]] = {role: [] for role in ROLES}
        self.health: dict[str, str] = {}
        self._misses: dict[str, int] = {}
        self.in_flight: Counter[str] = Counter()
        self.in_flight_tokens: Counter[str] = Counter()
        self.refreshed_at = 0.0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tasks: list[asyncio.Task] = []
        self._refreshed = asyncio.Event()

    async def start(self) -> None:
        await self.refresh()
        await self.check_health()
        self._tasks = [
            asyncio.create_task(self._every(self.refresh_seconds, self.refresh), name="registry-refresh"),
            asyncio.create_task(self._every(self.health_seconds, self.check_health), name="health-checks"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)  # they ask Redis: one cancel may not take
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _every(self, seconds: float, fn) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception as exc:  # keep the last known view; Redis may be back soon
                log.warning("worker pool update failed", extra={"step": fn.__name__, "error": str(exc)})

    async def refresh(self) -> None:
        records = await self.registry.list_instances()
        by_role: dict[str, list[InstanceRecord]] = {role: [] for role in ROLES}
        for record in records:
            by_role.setdefault(record.role, []).append(record)
        self.records = by_role
        self.refreshed_at = time.time()
        live = {r.address for rs in by_role.values() for r in rs}
        for address in [a for a in self._channels if a not in live]:
            await self._channels.pop(address).close()

    async def check_health(self) -> None:
        records = [r for role in ("prefill", "decode", "kvstore", "expert") for r in self.records.get(role, [])]
        results = await asyncio.gather(*(self._check(r) for r in records))
        misses = {}
        for record, status in zip(records, results):
            if status.startswith("UNREACHABLE"):
                # One missed check on a busy machine is not an outage; two in a row is.
                misses[record.instance_id] = self._misses.get(record.instance_id, 0) + 1
                if misses[record.instance_id] < UNREACHABLE_AFTER_MISSES:
                    status = self.health.get(record.instance_id, HEALTH_SERVING)
            self.health[record.instance_id] = status
        self._misses = misses
        live = {r.instance_id for r in records}
        for instance_id in [i for i in self.health if i not in live]:
            del self.health[instance_id]

    async def _check(self, record: InstanceRecord) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel(record.address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.health_timeout)
        except grpc.RpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=channel_options())
        return self._channels[address]

    def serves_model(self, record: InstanceRecord) -> bool:
        return str(record.capabilities.get("model", "")) == self.model

    def candidates(self, role: str) -> list[Candidate]:
        """Live workers of ``role`` serving this router's model; one that failed its last
        health check (draining, unreachable) is left out until it passes again."""
        return [
            Candidate(r, self.in_flight[r.instance_id], self.in_flight_tokens[r.instance_id])
            for r in self.records.get(role, [])
            if self.serves_model(r) and self.health.get(r.instance_id, HEALTH_SERVING) == HEALTH_SERVING
        ]

    def forget(self, instance_id: str) -> None:
        """Set a worker aside after a failed call, until the registry or a health check
        says it is back."""
        self.health[instance_id] = "UNREACHABLE (failed a call)"

    def acquire(self, instance_id: str, tokens: int = 0) -> None:
        self.in_flight[instance_id] += 1
        self.in_flight_tokens[instance_id] += tokens

    def release(self, instance_id: str, tokens: int = 0) -> None:
        self.in_flight[instance_id] -= 1
        self.in_flight_tokens[instance_id] -= tokens
        if self.in_flight[instance_id] <= 0:
            del self.in_flight[instance_id]
            self.in_flight_tokens.pop(instance_id, None)

    async def lookup_stored(self, hashes) -> list[str | None]:
        try:
            return await lookup(self.redis, hashes)
        except Exception as exc:  # routing goes on without the index
            log.warning("KV index lookup failed", extra={"error": str(exc)})
            return [None] * len(hashes)

    def max_model_len(self) -> int | None:
        """The smallest context of the live prefill and decode workers (None: none live)."""
        lengths = [
            int(r.capabilities["max_model_len"])
            for role in ("prefill", "decode")
            for r in self.records.get(role, [])
            if self.serves_model(r) and "max_model_len" in r.capabilities
        ]
        return min(lengths) if lengths else None

    def snapshot(self) -> dict[str, Any]:
        """Every registered instance by role, with health, load and this router's view."""
        now = time.time()
        roles = {}
        for role, records in sorted(self.records.items()):
            roles[role] = [
                {
                    "instance_id": r.instance_id,
                    "address": r.address,
                    "health": self.health.get(r.instance_id, HEALTH_SERVING if role == "router" else HEALTH_UNKNOWN),
                    "serves_model": role in ("kvstore", "router") or self.serves_model(r),
                    "load": r.load,
                    "in_flight": self.in_flight.get(r.instance_id, 0),
                    "capabilities": r.capabilities,
                    "uptime_seconds": round(now - r.started_at, 1),
                    "heartbeat_age_seconds": round(now - r.heartbeat_at, 2) if r.heartbeat_at else None,
                }
                for r in sorted(records, key=lambda r: r.instance_id)
            ]
        return {"model": self.model, "refreshed_at": self.refreshed_at, "roles": roles}
