"""Discovery over a real Redis: register, heartbeat, load updates, expiry, deregister."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from cleave.common import redis_metrics, registry as reg
from cleave.common.registry import (
    AsyncRegistration,
    AsyncRegistry,
    InstanceRecord,
    Registry,
)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return value


def ids(records):
    return [r.instance_id for r in records]


@pytest.fixture
def registry(redis_url):
    r = Registry.from_url(redis_url)
    yield r
    r.client.close()


def test_register_lists_by_role_with_its_fields(registry):
    registry.register(InstanceRecord("prefill", "p1", "127.0.0.1:5001", {"model": "tiny"}, {"queue": 0}), ttl=5)
    registry.register(InstanceRecord("decode", "d1", "127.0.0.1:5002"), ttl=5)
    registry.register(InstanceRecord("prefill", "p0", "127.0.0.1:5003"), ttl=5)

    assert ids(registry.list_instances("prefill")) == ["p0", "p1"]
    assert ids(registry.list_instances("decode")) == ["d1"]
    assert ids(registry.list_instances()) == ["d1", "p0", "p1"]
    assert registry.list_instances("kvstore") == []
    p1 = registry.get("prefill", "p1")
    assert (p1.address, p1.capabilities, p1.load) == ("127.0.0.1:5001", {"model": "tiny"}, {"queue": 0})
    assert p1.heartbeat_at >= p1.started_at > 0


def test_a_client_without_decode_responses_reads_the_same_records(registry, redis_url):
    registry.register(InstanceRecord("decode", "raw", "127.0.0.1:9"), ttl=5)
    raw = Registry(redis.Redis.from_url(redis_url))
    assert [(r.role, r.instance_id, r.address) for r in raw.list_instances()] == [("decode", "raw", "127.0.0.1:9")]


def test_keys_are_prefixed_and_expire(registry):
    registry.register(InstanceRecord("kvstore", "s1", "127.0.0.1:1"), ttl=2)
    ttl_ms = registry.client.pttl("cleave:instance:kvstore:s1")
    assert 0 < ttl_ms <= 2000
    assert registry.client.smembers("cleave:instances:kvstore") == {"s1"}
    assert "kvstore" in registry.client.smembers("cleave:roles")


def test_dead_instance_drops_out_within_ttl_and_is_pruned(registry):
    registry.register(InstanceRecord("decode", "dead", "127.0.0.1:1"), ttl=0.3)
    registry.register(InstanceRecord("decode", "alive", "127.0.0.1:2"), ttl=30)
    registered_at = time.monotonic()
    assert ids(registry.list_instances("decode")) == ["alive", "dead"]

    wait_until(lambda: ids(registry.list_instances("decode")) == ["alive"], what="the dead instance to expire")
    assert time.monotonic() - registered_at < 0.3 + 1.0
    assert registry.client.smembers("cleave:instances:decode") == {"alive"}


def test_listing_every_role_reads_redis_in_three_round_trips_and_prunes_each_roles_dead(registry, redis_url):
    """The router lists every role twice a second: one round trip per role and command
    cost its event loop ~0.25 ms each. Listed in order of role, then id, with the expired
    records of two roles left out and pruned from their sets in one more round trip."""
    roles = ("decode", "expert", "kvstore", "prefill", "router")
    for role in roles:
        registry.register(InstanceRecord(role, f"{role}-1", "127.0.0.1:1"), ttl=30)
        registry.register(InstanceRecord(role, f"{role}-0", "127.0.0.1:2"), ttl=30)
    for role in ("decode", "kvstore"):
        registry.register(InstanceRecord(role, f"{role}-gone", "127.0.0.1:3"), ttl=0.1)
    wait_until(lambda: not registry.client.exists("cleave:instance:decode:decode-gone", "cleave:instance:kvstore:kvstore-gone"),
               what="the short-lived records to expire")

    def count() -> float:  # round trips of this process' measured clients so far
        return next(s.value for s in redis_metrics.COMMAND_SECONDS.collect()[0].samples if s.name.endswith("_count"))

    async def scenario():
        registry_ = AsyncRegistry.from_url(redis_url)
        await registry_.client.ping()  # the connection's own handshake is not the listing's
        before = count()
        first = await registry_.list_instances()
        pruning = count() - before
        before = count()
        second = await registry_.list_instances()
        pruned = count() - before
        await registry_.close()
        return first, second, pruning, pruned

    first, second, pruning, pruned = asyncio.run(scenario())
    expected = [(role, f"{role}-{i}") for role in roles for i in (0, 1)]
    assert [(r.role, r.instance_id) for r in first] == expected
    assert [(r.role, r.instance_id) for r in second] == expected
    assert (pruning, pruned) == (4, 3)
    assert registry.client.smembers("cleave:instances:decode") == {"decode-0", "decode-1"}
    assert registry.client.smembers("cleave:instances:kvstore") == {"kvstore-0", "kvstore-1"}
    assert [(r.role, r.instance_id) for r in registry.list_instances()] == expected


def registered(redis_url: str, record: InstanceRecord, **kwargs) -> AsyncRegistration:
    return AsyncRegistration(AsyncRegistry.from_url(redis_url), record, **kwargs)


async def await_until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def test_heartbeat_keeps_an_instance_alive_past_its_ttl(registry, redis_url):
    async def scenario():
        record = InstanceRecord("prefill", "hb", "127.0.0.1:1")
        async with registered(redis_url, record, ttl=0.5, interval=0.05) as registration:
            started = time.monotonic()
            # Two TTLs without dropping out once.
            while time.monotonic() - started < 1.0:
                assert ids(registry.list_instances("prefill")) == ["hb"]
                await asyncio.sleep(0.02)
            assert registration.num_heartbeats >= 5
            assert registration.num_heartbeat_errors == 0
        await registration.registry.close()

    asyncio.run(scenario())
    # Deregistered at once on stop, not after a TTL.
    assert registry.list_instances("prefill") == []
    assert registry.client.exists("cleave:instance:prefill:hb") == 0


def test_update_load_is_published_without_waiting_for_the_next_heartbeat(registry, redis_url):
    async def scenario():
        record = InstanceRecord("decode", "ld", "127.0.0.1:1", load={"free_blocks": 100})
        async with registered(redis_url, record, ttl=30) as registration:  # heartbeat every 10 s
            assert registry.get("decode", "ld").load == {"free_blocks": 100}
            registration.update_load(free_blocks=7, running=3)
            await await_until(lambda: registry.get("decode", "ld").load == {"free_blocks": 7, "running": 3},
                              what="load")
        await registration.registry.close()

    asyncio.run(scenario())


def test_stopped_without_deregister_expires_on_its_own(registry, redis_url):
    async def scenario():
        registration = await registered(redis_url, InstanceRecord("expert", "e1", "127.0.0.1:1"), ttl=0.3).start()
        await registration.stop(deregister=False)
        await registration.registry.close()

    asyncio.run(scenario())
    assert ids(registry.list_instances("expert")) == ["e1"]
    wait_until(lambda: registry.list_instances("expert") == [], what="expiry after a crash-like stop")


def test_heartbeat_re_registers_after_its_keys_vanish(registry, redis_url):
    # Keys evicted from Redis behind the instance's back (a restart, a FLUSHALL) come
    # back with the next heartbeat.
    async def scenario():
        async with registered(redis_url, InstanceRecord("router", "r1", "127.0.0.1:1"), ttl=1,
                              interval=0.05) as registration:
            registry.client.flushdb()
            await await_until(lambda: ids(registry.list_instances("router")) == ["r1"], what="re-registration")
        await registration.registry.close()

    asyncio.run(scenario())


def test_unreachable_redis_fails_registration_loudly():
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    import redis.asyncio as aioredis

    async def scenario():
        client = aioredis.Redis(port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.ConnectionError):
            await AsyncRegistration(AsyncRegistry(client), InstanceRecord("router", "r1", "127.0.0.1:1")).start()
        await client.aclose()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"role": "", "instance_id": "x"}, "role"),
        ({"role": "decode", "instance_id": "a:b"}, "instance_id"),
    ],
)
def test_bad_records_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InstanceRecord(address="127.0.0.1:1", **kwargs)


@pytest.mark.parametrize("ttl, interval", [(0.01, None), (1.0, 1.0), (1.0, 0.0)])
def test_bad_ttl_or_interval_is_rejected(redis_url, ttl, interval):
    with pytest.raises(ValueError):
        registered(redis_url, InstanceRecord("decode", "x", "127.0.0.1:1"), ttl=ttl, interval=interval)


def test_async_registration_heartbeats_updates_and_deregisters(redis_url):
    sync_view = Registry.from_url(redis_url)

    async def scenario():
        registry = AsyncRegistry.from_url(redis_url)
        record = InstanceRecord("kvstore", "a1", "127.0.0.1:7000", {"tier": "memory"})
        async with AsyncRegistration(registry, record, ttl=0.5, interval=0.05) as registration:
            assert ids(await registry.list_instances("kvstore")) == ["a1"]
            registration.update_load(num_blocks=12)
            deadline = time.monotonic() + 5
            while (await registry.get("kvstore", "a1")).load != {"num_blocks": 12}:
                assert time.monotonic() < deadline, "load update not published"
                await asyncio.sleep(0.01)
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                assert ids(sync_view.list_instances("kvstore")) == ["a1"]
                await asyncio.sleep(0.02)
            assert registration.num_heartbeats >= 5
        assert await registry.list_instances("kvstore") == []
        await registry.close()

    asyncio.run(scenario())


def test_key_helpers_match_the_documented_names():
    assert reg.instance_key("decode", "d1") == "cleave:instance:decode:d1"
    assert reg.members_key("decode") == "cleave:instances:decode"
    assert reg.ROLES_KEY == "cleave:roles"


def test_redis_script_starts_reports_and_stops_idempotently(tmp_path):
    import os
    import shutil
    import socket
    import subprocess
    from pathlib import Path

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed; run infra/scripts/redis.sh install")
    script = Path(__file__).resolve().parents[1] / "infra" / "scripts" / "redis.sh"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "CLEAVE_HOME": str(tmp_path), "CLEAVE_REDIS_PORT": str(port)}

    def redis_sh(command: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), command], env=env, capture_output=True, text=True, timeout=60)

    assert redis_sh("install").returncode == 0  # already installed: a no-op
    assert redis_sh("status").returncode == 3
    try:
        assert redis_sh("start").returncode == 0
        client = redis.Redis(port=port)
        assert client.ping()
        assert client.config_get("save") == {"save": ""} and client.config_get("bind")["bind"] == "127.0.0.1"
        again = redis_sh("start")
        assert again.returncode == 0 and "already running" in again.stderr
        status = redis_sh("status")
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout
        pid = int((tmp_path / "redis" / f"redis-{port}.pid").read_text())
    finally:
        stopped = redis_sh("stop")
    assert stopped.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert redis_sh("status").returncode == 3 and redis_sh("stop").returncode == 0
    assert (tmp_path / "redis" / f"redis-{port}.log").is_file()
