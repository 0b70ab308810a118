"""What a long-running service does once it has loaded everything."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model, the tokenizer, the imported
    modules: hundreds of thousands) out of the garbage collector's reach. They live as
    long as the process, and without this each full collection walks all of them again
    in the middle of some request's step."""
    gc.collect()
    gc.freeze()


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's main coroutine on uvloop. A gRPC call costs the server about a
    third less CPU there than on asyncio's own loop (one-token RunExperts, measured in
    docs/benchmarks.md), and the router's uvicorn runs on it already."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
