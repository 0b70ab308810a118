"""Discovery and load reports over Redis.

Every service instance registers itself and keeps its record alive with heartbeats;
a record that is not refreshed expires on the Redis server, so a dead instance drops
out within one TTL without anyone cleaning up after it.

Redis keys (all prefixed ``cleave:``):

``cleave:instance:<role>:<instance_id>``
    JSON of :class:`InstanceRecord`, expiring ``ttl`` seconds after the last heartbeat.
``cleave:instances:<role>``
    Set of the instance ids ever registered under the role; ids whose record has expired
    are pruned by readers. It spares readers a ``SCAN`` over a keyspace that also holds
    the KV index (millions of keys).
``cleave:roles``
    Set of roles with registrations.

Readers use :class:`Registry` (sync) or :class:`AsyncRegistry`; a service keeps itself
registered with :class:`AsyncRegistration`, a heartbeat task (every service runs asyncio).
Both registries read and write the same keys.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from cleave.common.redis_metrics import async_client

log = logging.getLogger("cleave.registry")

PREFIX = "cleave:"
ROLES_KEY = PREFIX + "roles"
DEFAULT_TTL_SECONDS = 5.0
# infra/scripts/redis.sh and `cleave up` start Redis here.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6390/0"
# A hung Redis must not hang a heartbeat (and so a drain) forever.
CLIENT_OPTIONS = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}


def instance_key(role: str, instance_id: str) -> str:
    return f"{PREFIX}instance:{role}:{instance_id}"


def members_key(role: str) -> str:
    return f"{PREFIX}instances:{role}"


@dataclass(slots=True)
class InstanceRecord:
    """One registered instance. ``address`` is the ``host:port`` of its gRPC server."""

    role: str
    instance_id: str
    address: str
    capabilities: dict[str, Any] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    heartbeat_at: float = 0.0

    def __post_init__(self) -> None:
        for name in ("role", "instance_id"):
            value = getattr(self, name)
            if not value or ":" in value:
                raise ValueError(f"{name} must be non-empty and free of ':', got {value!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> "InstanceRecord":
        return cls(**json.loads(raw))


def _validate_ttl(ttl: float) -> int:
    ttl_ms = int(ttl * 1000)
    if ttl_ms < 100:
        raise ValueError(f"ttl must be at least 0.1 s, got {ttl}")
    return ttl_ms


def _write(pipe: Any, record: InstanceRecord, ttl_ms: int) -> None:
    record.heartbeat_at = time.time()
    pipe.set(instance_key(record.role, record.instance_id), record.to_json(), px=ttl_ms)
    pipe.sadd(members_key(record.role), record.instance_id)
    pipe.sadd(ROLES_KEY, record.role)


def _delete(pipe: Any, role: str, instance_id: str) -> None:
    pipe.delete(instance_key(role, instance_id))
    pipe.srem(members_key(role), instance_id)


def _ask_members(pipe: Any, roles: list[str]) -> None:
    for role in roles:
        pipe.smembers(members_key(role))


def _prune(pipe: Any, dead: dict[str, list[str]]) -> None:
    for role, gone in dead.items():
        pipe.srem(members_key(role), *gone)


def _text(value: str | bytes) -> str:
    # Callers may hand in clients without decode_responses.
    return value.decode() if isinstance(value, bytes) else value


def _ids_by_role(roles: list[str], members: list[Any]) -> dict[str, list[str]]:
    """Role -> its registered ids, sorted, from one SMEMBERS reply per role."""
    return {role: sorted(map(_text, ids)) for role, ids in zip(roles, members) if ids}


def _keys(ids: dict[str, list[str]]) -> list[str]:
    return [instance_key(role, i) for role, each in ids.items() for i in each]


def _parse_live(ids: dict[str, list[str]], raws: list[Any]) -> tuple[list[InstanceRecord], dict[str, list[str]]]:
    """The records of ``ids`` from one MGET of their keys (:func:`_keys`) and, per role,
    the ids whose record has expired."""
    live: list[InstanceRecord] = []
    dead: dict[str, list[str]] = {}
    found = iter(raws)
    for role, each in ids.items():
        for instance_id, raw in zip(each, found):
            if raw is None:
                dead.setdefault(role, []).append(instance_id)
            else:
                live.append(InstanceRecord.from_json(raw))
    return live, dead


class Registry:
    """Reads and writes registrations with a synchronous redis-py client."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> "Registry":
        return cls(redis.Redis.from_url(url, decode_responses=True, **CLIENT_OPTIONS))

    def register(self, record: InstanceRecord, ttl: float = DEFAULT_TTL_SECONDS) -> None:
        """Write (or refresh) ``record``, alive for ``ttl`` seconds."""
        with self.client.pipeline(transaction=False) as pipe:
            _write(pipe, record, _validate_ttl(ttl))
            pipe.execute()

    def deregister(self, role: str, instance_id: str) -> None:
        with self.client.pipeline(transaction=False) as pipe:
            _delete(pipe, role, instance_id)
            pipe.execute()

    def list_instances(self, role: str | None = None) -> list[InstanceRecord]:
        """Live instances of ``role`` (of every role if None), ordered by role then id."""
        roles = [role] if role else sorted(map(_text, self.client.smembers(ROLES_KEY)))
        with self.client.pipeline(transaction=False) as pipe:
            _ask_members(pipe, roles)
            ids = _ids_by_role(roles, pipe.execute())
        keys = _keys(ids)
        records, dead = _parse_live(ids, self.client.mget(keys) if keys else [])
        if dead:
            with self.client.pipeline(transaction=False) as pipe:
                _prune(pipe, dead)
                pipe.execute()
        return records

    def get(self, role: str, instance_id: str) -> InstanceRecord | None:
        raw = self.client.get(instance_key(role, instance_id))
        return None if raw is None else InstanceRecord.from_json(raw)


class AsyncRegistry:
    """The same as :class:`Registry` over ``redis.asyncio``."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    @classmethod
    def from_url(cls, url: str) -> "AsyncRegistry":
        return cls(async_client(url, decode_responses=True, **CLIENT_OPTIONS))

    async def register(self, record: InstanceRecord, ttl: float = DEFAULT_TTL_SECONDS) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            _write(pipe, record, _validate_ttl(ttl))
            await pipe.execute()

    async def deregister(self, role: str, instance_id: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            _delete(pipe, role, instance_id)
            await pipe.execute()

    async def list_instances(self, role: str | None = None) -> list[InstanceRecord]:
        # Three round trips whatever the number of roles: the router lists every role
        # twice a second, and each redis-py command costs its event loop ~0.25 ms of CPU.
        roles = [role] if role else sorted(map(_text, await self.client.smembers(ROLES_KEY)))
        async with self.client.pipeline(transaction=False) as pipe:
            _ask_members(pipe, roles)
            ids = _ids_by_role(roles, await pipe.execute())
        keys = _keys(ids)
        records, dead = _parse_live(ids, await self.client.mget(keys) if keys else [])
        if dead:
            async with self.client.pipeline(transaction=False) as pipe:
                _prune(pipe, dead)
                await pipe.execute()
        return records

    async def get(self, role: str, instance_id: str) -> InstanceRecord | None:
        raw = await self.client.get(instance_key(role, instance_id))
        return None if raw is None else InstanceRecord.from_json(raw)

    async def close(self) -> None:
        await self.client.aclose()


def _heartbeat_interval(ttl: float, interval: float | None) -> float:
    # A third of the TTL survives one lost heartbeat (a Redis blip, a GC pause) without
    # the instance dropping out.
    interval = ttl / 3 if interval is None else interval
    if not 0 < interval < ttl:
        raise ValueError(f"heartbeat interval must be in (0, ttl={ttl}), got {interval}")
    return interval


# Load updates wake the heartbeat early, but a caller updating on every engine step must
# not turn into a Redis write per step.
MIN_PUBLISH_INTERVAL = 0.05


class AsyncRegistration:
    """Keeps one instance registered from an asyncio task; the grpc.aio services' choice."""

    def __init__(
        self, registry: AsyncRegistry, record: InstanceRecord, ttl: float = DEFAULT_TTL_SECONDS,
        interval: float | None = None,
    ) -> None:
        _validate_ttl(ttl)
        self.registry = registry
        self.record = record
        self.ttl = ttl
        self.interval = _heartbeat_interval(ttl, interval)
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.num_heartbeats = 0
        self.num_heartbeat_errors = 0

    async def start(self) -> "AsyncRegistration":
        """Register now (raising if Redis is unreachable), then heartbeat from a task."""
        await self.registry.register(self.record, self.ttl)
        self.num_heartbeats += 1
        self._task = asyncio.create_task(self._run(), name=f"registry-{self.record.instance_id}")
        return self

    def update_load(self, **load: Any) -> None:
        self.record.load.update(load)
        self._wake.set()

    async def stop(self, deregister: bool = True) -> None:
        """Stop heartbeating; with ``deregister`` the instance disappears at once."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            # Awaited, not cancelled: a cancelled heartbeat may already be on the wire
            # and land after the delete.
            await self._task
            self._task = None
        if deregister:
            await self.registry.deregister(self.record.role, self.record.instance_id)

    async def __aenter__(self) -> "AsyncRegistration":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
            if self._stopping:
                return
            try:
                await self.registry.register(self.record, self.ttl)
                self.num_heartbeats += 1
            except (redis.RedisError, OSError) as exc:
                self.num_heartbeat_errors += 1
                log.warning("heartbeat failed", extra={"instance_id": self.record.instance_id, "error": str(exc)})
            await asyncio.sleep(MIN_PUBLISH_INTERVAL)
