"""An asyncio front for :class:`LLMEngine`: the engine loop runs in its own thread
(torch releases the GIL in its kernels) and hands each request's outputs to the
event loop that asked for them."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from cleave.engine.config import EngineConfig
from cleave.engine.kv_transfer import KVBlock
from cleave.engine.llm_engine import LLMEngine
from cleave.engine.outputs import RequestOutput
from cleave.engine.sampling_params import SamplingParams
from cleave.models.moe import ExpertBackendError

log = logging.getLogger("cleave.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped; no request can be served."""


class EngineStepError(RuntimeError):
    """A step failed: each request it ran fails with one of these, whose ``__cause__``
    is the step's exception (e.g. :class:`cleave.models.moe.ExpertBackendError`, which
    the workers report as UNAVAILABLE); the engine goes on serving."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"engine step failed: {cause}")
        self.__cause__ = cause


class AsyncLLMEngine:
    """Implements :class:`cleave.engine.outputs.EngineClient` over a local engine."""

    def __init__(self, config: EngineConfig | None = None, engine: LLMEngine | None = None) -> None:
        self.engine = engine or LLMEngine(config)
        self._cond = threading.Condition()
        self._pending: list[tuple[str, object]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = self.engine.stats()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        """The engine loop is alive and not shutting down: requests can be served."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def stats(self) -> dict[str, int | float]:
        """The engine's counters as of its last step (read without stopping it)."""
        return dict(self._stats, num_requests=len(self._streams))

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="cleave-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, num_output_tokens: int = 0
    ) -> AsyncIterator[RequestOutput]:
        if self._thread is None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        self.engine.validate(prompt_token_ids, params, num_output_tokens)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), queue)
        self._submit("add", (request_id, list(prompt_token_ids), params, num_output_tokens))
        finished = False
        held: BaseException | None = None
        try:
            while True:
                item = held or await queue.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer slower than the engine's steps gets what piled up as one
                # output: one message, one SSE chunk, instead of one per token behind.
                later: list[RequestOutput] = []
                last = item
                while not last.finished and not queue.empty():
                    last = queue.get_nowait()
                    if isinstance(last, BaseException):
                        held = last
                        break
                    later.append(last)
                if later:
                    item = merge_outputs(item, later)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit("abort", request_id)

    async def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    # -- KV blocks, moved on the engine's own thread between steps --------------------
    async def num_cached_blocks(self, block_hashes: list[int]) -> int:
        """How many of ``block_hashes``, from the first, this engine's prefix cache holds."""
        return await self._call(self._count_cached, block_hashes)

    async def import_blocks(self, blocks: list[KVBlock]) -> int:
        return await self._call(self.engine.import_blocks, blocks)

    async def export_blocks(self, block_hashes: list[int]) -> list[KVBlock]:
        return await self._call(self.engine.export_blocks, block_hashes)

    def _count_cached(self, block_hashes: list[int]) -> int:
        count = 0
        while count < len(block_hashes) and self.engine.block_manager.lookup(block_hashes[count]) is not None:
            count += 1
        return count

    async def _call(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread, where the block pool is never mid-step."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._submit("call", (fn, args, future))
        return await future

    def _submit(self, kind: str, payload: object) -> None:
        with self._cond:
            self._pending.append((kind, payload))
            self._cond.notify()

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one wake-up rather than one per
        request: at batches of tens, the per-call cost of waking a loop was most of it."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    @staticmethod
    def _run_call(fn, args, future: asyncio.Future) -> None:
        loop = future.get_loop()
        try:
            result = fn(*args)
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._pending and not engine.has_unfinished() and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    break
                pending, self._pending = self._pending, []
            for kind, payload in pending:
                if kind == "add":
                    request_id, prompt, params, num_output_tokens = payload
                    try:
                        engine.add_request(request_id, prompt, params, num_output_tokens)
                    except ValueError as exc:
                        self._deliver(request_id, exc)
                elif kind == "call":
                    self._run_call(*payload)
                else:
                    engine.abort_request(payload)
            try:
                outputs = engine.step()
            except Exception as exc:  # not bad input: fail what is running, keep serving
                if isinstance(exc, ExpertBackendError):  # the expert pool, not this process: no traceback
                    log.warning("engine step failed; aborting running requests", extra={"error": str(exc)})
                else:
                    log.exception("engine step failed; aborting running requests")
                for request_id in list(engine.sequences):
                    engine.abort_request(request_id)
                    self._deliver(request_id, EngineStepError(exc))
                continue
            self._stats = engine.stats()
            self._deliver_step(outputs)
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the engine shut down"))
        for kind, payload in self._pending:
            if kind == "call":
                future = payload[2]
                future.get_loop().call_soon_threadsafe(_settle, future, None, EngineDeadError("the engine shut down"))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def merge_outputs(first: RequestOutput, later: list[RequestOutput]) -> RequestOutput:
    """Successive outputs of one request as one: the tokens of all, the state of the last."""
    last = later[-1]
    token_ids, logprobs, served_by = list(first.new_token_ids), list(first.new_logprobs), dict(first.served_by)
    for out in later:
        token_ids += out.new_token_ids
        logprobs += out.new_logprobs
        served_by.update(out.served_by)
    return RequestOutput(first.request_id, token_ids, logprobs, last.finished, last.finish_reason,
                         last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens, served_by)


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.cancelled():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
