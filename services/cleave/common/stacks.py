"""Where a process is waiting: the stack of every asyncio task and every thread, as text.

A drain step that overruns logs this, so a hang names its await instead of only its time.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback


def format_stacks(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """The tasks of ``loop`` (default: the running one, if any), then every thread.
    Safe to call from another thread than the loop's, for a report."""
    lines: list[str] = []
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
    if loop is not None:
        for task in _tasks(loop):
            lines.append(f"task {task.get_name()}:")
            summary = traceback.StackSummary.extract((frame, frame.f_lineno) for frame in _await_chain(task.get_coro()))
            lines.extend("  " + line.rstrip() for line in summary.format())
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        lines.append(f"thread {names.get(ident, ident)}:")
        lines.extend("  " + line.rstrip() for line in traceback.format_stack(frame))
    return "\n".join(lines)


def _await_chain(awaitable: object):
    """The frames from a task's coroutine down to what it waits on (``Task.get_stack``
    gives only the outermost coroutine's frame)."""
    while awaitable is not None:
        frame = (getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
                 or getattr(awaitable, "gi_frame", None))
        if frame is None:
            return
        yield frame
        awaitable = (getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
                     or getattr(awaitable, "gi_yieldfrom", None))


def _tasks(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task]:
    # all_tasks iterates a WeakSet the loop's thread may be changing: retry then.
    for _ in range(10):
        try:
            return list(asyncio.all_tasks(loop))
        except RuntimeError:
            continue
    return []
