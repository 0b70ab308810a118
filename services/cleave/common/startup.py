"""What a long-running service does once it has loaded everything."""

from __future__ import annotations

import asyncio
import ctypes
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


# glibc mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap (the most glibc accepts on 64-bit), and this
# much free heap is kept for reuse: where glibc's own adjusting would end up at most.
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def prepare_to_serve() -> bool:
    """What a service does once it has loaded everything, before its first request:
    :func:`freeze_startup_heap` and :func:`keep_freed_memory`. Returns the latter's result."""
    freeze_startup_heap()
    return keep_freed_memory()


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model, the tokenizer, the imported
    modules: hundreds of thousands) out of the garbage collector's reach. They live as
    long as the process, and without this each full collection walks all of them again
    in the middle of some request's step."""
    gc.collect()
    gc.freeze()


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what a call frees for the next call. By default it maps
    each block above a threshold (128 KiB, rising as such blocks are freed) afresh and
    gives the heap's free top back past another (twice the first): a service that builds
    and drops a message of a few hundred KiB per call, as the KV store does with a
    request's packed blocks, then faults every page of it in again on each call (160–225
    page faults a call, a third of the CPU of a KV store read here; docs/benchmarks.md,
    run M). The thresholds its adjusting would reach at most, fixed from the start (which
    stops the adjusting), end that for every block up to 32 MiB (a burst's activations
    included) at the price of at most ``TRIM_THRESHOLD_BYTES`` of free memory kept per
    heap. False where the C library has no ``mallopt`` (musl, macOS): nothing to tune."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Run a service's main coroutine on uvloop. A gRPC call costs the server about a
    third less CPU there than on asyncio's own loop (one-token RunExperts, measured in
    docs/benchmarks.md), and the router's uvicorn runs on it already."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
