"""Background tasks stop even when a cancellation is swallowed: redis-py's asyncio
client swallows one that lands inside a command (real Redis here), and a drain that
waited on such a task after one cancel never ended (the test cluster's teardown hung)."""

from __future__ import annotations

import asyncio
import logging
import random

import redis.asyncio as aioredis

from cleave.common.tasks import cancel_and_wait


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def swallowing_loop(counts: dict, swallow: int) -> None:
    """A background loop whose "command" swallows the first ``swallow`` cancellations."""
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            counts["cancels"] += 1
            if counts["cancels"] > swallow:
                raise


def test_a_task_that_swallows_a_cancel_is_cancelled_again_until_it_stops():
    async def scenario():
        counts = {"cancels": 0}
        task = asyncio.create_task(swallowing_loop(counts, swallow=2))
        await asyncio.sleep(0.005)
        task.cancel()
        await asyncio.wait({task}, timeout=0.3)
        assert not task.done()  # one cancel is not enough for such a loop
        await cancel_and_wait(task, timeout=5)
        return task, counts

    task, counts = run(scenario())
    assert task.cancelled() and counts["cancels"] == 3


def test_a_task_that_never_stops_is_named_and_left_after_the_timeout(caplog):
    async def scenario():
        task = asyncio.create_task(swallowing_loop({"cancels": 0}, swallow=10**9), name="stubborn")
        await asyncio.sleep(0.005)
        with caplog.at_level(logging.ERROR, logger="cleave.tasks"):
            await cancel_and_wait(task, None, timeout=0.3)
        done = task.done()
        task.get_coro().close()  # a swallowing loop never ends on its own
        return done

    assert run(scenario()) is False
    [record] = [r for r in caplog.records if r.getMessage() == "tasks did not stop"]
    assert record.tasks == ["stubborn"]


def test_loops_over_real_redis_commands_stop_wherever_the_cancel_lands(redis_url):
    async def commands(client) -> None:
        while True:
            await asyncio.sleep(0.001)
            await client.smembers("cleave:test:members")
            await client.mget(["cleave:test:a", "cleave:test:b"])

    async def scenario():
        rng = random.Random(0)
        stopped = 0
        for _ in range(40):
            client = aioredis.Redis.from_url(redis_url)
            task = asyncio.create_task(commands(client))
            await asyncio.sleep(rng.random() * 0.01)
            await cancel_and_wait(task, timeout=5)
            stopped += task.cancelled()
            await client.aclose()
        return stopped

    assert run(scenario()) == 40
