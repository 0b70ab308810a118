"""Stopping background tasks that may not take a single cancellation.

redis-py 8.1's asyncio client can swallow a task's cancellation that lands inside a
command: the command returns normally and the task goes on (measured: about one cancel in
ten, cancelling a loop of SMEMBERS/MGET at random moments). A background loop that talks
to Redis (load reports, registry refreshes, the dashboard's sampler) then outlives
``task.cancel()``, and whoever awaits it after one cancel waits forever: a drain that
never ends. So cancel again until the task is done; the next cancel lands on an await
that honours it (the loop's sleep).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("cleave.tasks")

RECANCEL_SECONDS = 0.05


async def cancel_and_wait(*tasks: asyncio.Task | None, timeout: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until each is done, cancelling again every
    RECANCEL_SECONDS while one is not; after ``timeout`` seconds, log those still
    running and return."""
    pending = {task for task in tasks if task is not None and not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            log.error("tasks did not stop", extra={"tasks": sorted(task.get_name() for task in pending)})
            return
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, remaining))
