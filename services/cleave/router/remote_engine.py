"""The router's engine: an ``EngineClient`` whose requests run on a prefill worker and a
decode worker chosen per request, joined by the KV store (docs/prefill-decode.md).

One request: route a prefill worker, ``Prefill`` (the prompt's KV goes to the store, the
first token comes back), route a decode worker of the same block hashes and relay its
stream, which rides the router's one ``Session`` call to that worker
(:mod:`cleave.router.decode_sessions`); a prompt of at most ``local_prefill_tokens`` goes
straight to a decode worker, which prefills it itself (conditional disaggregation). A
worker that fails before answering is set aside and the call goes to another; a decode
worker that dies mid-stream is replaced by another that resumes from the stored blocks and
every token already relayed, so the client sees one unbroken, identical stream. ``INVALID_ARGUMENT`` from a worker is the caller's fault and becomes a
``ValueError`` (HTTP 400); running out of workers is :class:`ServiceUnavailableError`
(HTTP 503)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncGenerator

import grpc

from cleave.common.wire import FAILURE_CAUSE_KEY, params_to_proto
from cleave.engine.outputs import RequestOutput, ServiceUnavailableError
from cleave.engine.sampling_params import SamplingParams
from cleave.events.lifecycle import NO_EVENTS, RequestEvents
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from cleave.router.decode_sessions import DecodeSessions, rpc_error
from cleave.router.plugins import Candidate, Pipeline, RoutingContext
from cleave.router.workers import WorkerPool

log = logging.getLogger("cleave.router")

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}
# Answers that say the request itself is wrong; another worker would say the same.
CALLER_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


def shared_cause(exc: grpc.RpcError) -> str | None:
    """The shared dependency a worker blamed for its failure (``experts``), if any: every
    worker would fail the same way, so the request fails now instead of moving on."""
    try:
        trailing = exc.trailing_metadata() or ()
    except Exception:
        return None
    return next((value for key, value in trailing if key == FAILURE_CAUSE_KEY), None)


@dataclass(slots=True)
class RemoteEngineConfig:
    max_attempts: int = 3  # workers tried per stage (prefill, and each decode resume)
    prefill_timeout: float = 120.0
    decode_timeout: float = 600.0
    fallback_max_model_len: int = 2048
    local_prefill_tokens: int = 0  # prompts this short go straight to a decode worker; 0: none


class RemoteEngineClient:
    def __init__(
        self, pool: WorkerPool, prefill: Pipeline, decode: Pipeline, config: RemoteEngineConfig | None = None,
        metrics=None, events: RequestEvents | None = None,
    ) -> None:
        self.pool = pool
        self.prefill_pipeline = prefill
        self.decode_pipeline = decode
        self.config = config or RemoteEngineConfig()
        self.metrics = metrics
        self.events = events or NO_EVENTS  # the front end emits through it too (events.lifecycle.events_of)
        self.sessions = DecodeSessions(pool.channel)
        self._calls: dict[str, grpc.aio.Call] = {}  # or a SessionStream: what abort() cancels
        self._aborted: dict[str, bool] = {}
        self._running = False

    async def start(self) -> None:
        await self.pool.start()
        self._running = True

    async def shutdown(self) -> None:
        self._running = False
        await self.sessions.close()
        await self.pool.close()

    @property
    def max_model_len(self) -> int:
        return self.pool.max_model_len() or self.config.fallback_max_model_len

    @property
    def is_running(self) -> bool:
        """Serving needs at least one prefill and one decode worker that pass health checks."""
        return self._running and bool(self.pool.candidates("prefill")) and bool(self.pool.candidates("decode"))

    async def abort(self, request_id: str) -> None:
        """End a running request; its stream's last output has finish reason ``abort``."""
        call = self._calls.get(request_id)
        if call is not None:
            self._aborted[request_id] = True
            call.cancel()

    async def _choose(self, pipeline: Pipeline, ctx: RoutingContext, failures: list[str] = ()) -> Candidate:
        chosen = await pipeline.choose(ctx, self.pool.candidates(ctx.role))
        if chosen is None:
            if failures:
                raise ServiceUnavailableError(
                    f"{ctx.role} failed on every worker tried ({len(failures)}): " + "; ".join(failures))
            raise ServiceUnavailableError(
                f"no {ctx.role} worker is available for model {self.pool.model!r}; try again later")
        if self.metrics is not None:
            self.metrics.observe_route(ctx.role, chosen, pipeline)
        self.events.routed(ctx.request_id, ctx.role, chosen, pipeline)
        return chosen

    async def _prefill(self, request_id: str, token_ids: list[int], params: SamplingParams):
        """The prefill worker, the stream's first message (the first token) and the call,
        still open for its second (the stored blocks): read it with :meth:`_stored_blocks`,
        then end it with :meth:`_end_prefill`."""
        ctx = RoutingContext("prefill", request_id, token_ids, lookup_stored=self.pool.lookup_stored)
        request = prefill_pb2.PrefillRequest(request_id=request_id, token_ids=token_ids, params=params_to_proto(params))
        failures: list[str] = []
        for _ in range(self.config.max_attempts):
            worker = await self._choose(self.prefill_pipeline, ctx, failures)
            stub = prefill_pb2_grpc.PrefillStub(self.pool.channel(worker.record.address))
            self.pool.acquire(worker.instance_id, len(token_ids))
            call = stub.Prefill(request, timeout=self.config.prefill_timeout)
            self._calls[request_id] = call
            try:
                first = await call.read()
                if first is grpc.aio.EOF:
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, "the prefill stream ended without a token")
                return worker, first, call
            except BaseException as exc:
                self._end_prefill(request_id, worker, call, len(token_ids))
                if not isinstance(exc, grpc.RpcError):
                    raise
                if exc.code() in CALLER_ERRORS:
                    raise ValueError(exc.details()) from None
                if shared_cause(exc):
                    raise ServiceUnavailableError(exc.details()) from None
                failures.append(self._set_aside(worker, "prefill", exc))
                ctx.exclude = ctx.exclude | {worker.instance_id}
        raise ServiceUnavailableError(f"prefill failed on {len(failures)} workers: " + "; ".join(failures))

    async def _stored_blocks(self, request_id: str, worker: Candidate, call) -> list[int] | None:
        """The prefill stream's second message: the hashes of the prompt's blocks now in
        the store; None when the request was aborted meanwhile. A stream that breaks here
        gives none, and decode computes what it cannot fetch: the first token is out."""
        try:
            message = await call.read()
        except asyncio.CancelledError:
            if self._aborted.pop(request_id, None) is None:
                raise
            return None
        except grpc.RpcError as exc:
            log.warning("prefill stream broke after the first token; decoding without its stored blocks",
                        extra={"request_id": request_id, "instance_id": worker.instance_id,
                               "error": f"{exc.code().name}: {exc.details()}"})
            return []
        if message is grpc.aio.EOF:
            log.warning("prefill stream ended after the first token; decoding without its stored blocks",
                        extra={"request_id": request_id, "instance_id": worker.instance_id})
            return []
        return list(message.block_hashes)

    def _end_prefill(self, request_id: str, worker: Candidate, call, num_tokens: int) -> None:
        if self._calls.get(request_id) is call:
            del self._calls[request_id]
        self._aborted.pop(request_id, None)
        call.cancel()  # a no-op once the stream has ended
        self.pool.release(worker.instance_id, num_tokens)

    def _set_aside(self, worker: Candidate, role: str, exc: grpc.RpcError) -> str:
        message = f"{worker.instance_id}: {exc.code().name}: {exc.details()}"
        log.warning(f"{role} worker failed; trying another", extra={"instance_id": worker.instance_id,
                                                                     "error": message})
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self.pool.forget(worker.instance_id)
        if self.metrics is not None:
            self.metrics.worker_failures.labels(role).inc()
        return message

    def _decode(self, worker: Candidate, request: decode_pb2.DecodeRequest):
        """The request's decode stream: on the worker's session where it has them, else a
        ``Decode`` call of its own. Either one reads items then EOF, and cancels."""
        address = worker.record.address
        if worker.record.capabilities.get("sessions"):
            return self.sessions.start(address, request, self.config.decode_timeout)
        stub = decode_pb2_grpc.DecodeStub(self.pool.channel(address))
        return stub.Decode(request, timeout=self.config.decode_timeout)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        prompt = list(prompt_token_ids)
        if len(prompt) <= self.config.local_prefill_tokens:
            # Conditional disaggregation: a short prompt costs a prefill worker a forward
            # pass of its own and the hand-off through the store more than it costs a
            # decode worker, which prefills it within a step of its running batch.
            ctx = RoutingContext("decode", request_id, prompt, lookup_stored=self.pool.lookup_stored)
            decode_worker = await self._choose(self.decode_pipeline, ctx)
            if self.metrics is not None:
                self.metrics.local_prefills.inc()
            generated, block_hashes, served_by = [], [], {"decode": decode_worker.instance_id}
            num_cached, announce = None, True  # the decode worker counts and names itself
        else:
            prefill_started = time.perf_counter()
            prefill_worker, first, prefill_call = await self._prefill(request_id, prompt, params)
            num_cached, announce = first.num_cached_tokens, False  # the first token named the workers
            try:
                self.events.prefill_done(request_id, prefill_worker.instance_id, num_cached,
                                         time.perf_counter() - prefill_started)
                served_by = {"prefill": prefill_worker.instance_id}
                generated = [first.first_token_id]
                logprobs = [first.logprob] if params.logprobs else []
                finish = FINISH_REASONS.get(first.finish_reason)
                if finish is not None:
                    yield RequestOutput(request_id, generated, logprobs, True, finish, len(prompt), 1,
                                        num_cached, served_by)
                    return

                ctx = RoutingContext("decode", request_id, prompt + generated, lookup_stored=self.pool.lookup_stored,
                                     root_hash=str(prefill_worker.record.capabilities.get("root_hash")))
                decode_worker = await self._choose(self.decode_pipeline, ctx)
                served_by["decode"] = decode_worker.instance_id
                # The first token goes out while the prefill worker puts the prompt's blocks.
                yield RequestOutput(request_id, list(generated), logprobs, False, None, len(prompt), 1,
                                    num_cached, dict(served_by))
                block_hashes = await self._stored_blocks(request_id, prefill_worker, prefill_call)
                if block_hashes is None:
                    yield RequestOutput(request_id, [], [], True, "abort", len(prompt), len(generated), num_cached)
                    return
            finally:
                self._end_prefill(request_id, prefill_worker, prefill_call, len(prompt))
        async with aclosing(self._relay(request_id, prompt, generated, block_hashes, params, decode_worker, ctx,
                                        served_by, num_cached, announce)) as outputs:
            async for output in outputs:
                yield output

    async def _relay(
        self, request_id: str, prompt: list[int], generated: list[int], block_hashes: list[int],
        params: SamplingParams, decode_worker: Candidate, ctx: RoutingContext, served_by: dict[str, str],
        num_cached: int | None, announce: bool,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The decode stream of a request with ``generated`` tokens so far, relayed; a decode
        worker that fails is replaced by another that resumes from every token relayed.
        ``num_cached``: the prompt tokens reused, None to take the decode worker's count
        (it prefills the prompt itself); ``announce``: the next output names ``served_by``."""
        failures: list[str] = []
        while True:
            request = decode_pb2.DecodeRequest(
                request_id=request_id, token_ids=prompt + generated, block_hashes=block_hashes,
                params=params_to_proto(params), num_generated=len(generated),
            )
            worker = decode_worker
            self.pool.acquire(worker.instance_id)
            call = self._decode(worker, request)
            self._calls[request_id] = call
            try:
                while (item := await call.read()) is not grpc.aio.EOF:
                    if num_cached is None:
                        num_cached = item.num_cached_tokens
                    generated.extend(item.token_ids)
                    finish = FINISH_REASONS.get(item.finish_reason)
                    yield RequestOutput(
                        request_id, list(item.token_ids), list(item.logprobs), finish is not None, finish,
                        len(prompt), len(generated), num_cached, dict(served_by) if announce else {},
                    )
                    announce = False
                    if finish is not None:
                        return
                raise rpc_error(grpc.StatusCode.UNAVAILABLE, "the decode stream ended before the request finished")
            except asyncio.CancelledError:
                if self._aborted.pop(request_id, None) is None:
                    raise
                yield RequestOutput(request_id, [], [], True, "abort", len(prompt), len(generated), num_cached or 0)
                return
            except grpc.RpcError as exc:
                if exc.code() in CALLER_ERRORS:
                    raise ValueError(exc.details()) from None
                if shared_cause(exc):
                    raise ServiceUnavailableError(exc.details()) from None
                failures.append(self._set_aside(worker, "decode", exc))
                if len(failures) >= self.config.max_attempts:
                    raise ServiceUnavailableError(
                        f"decode failed on {len(failures)} workers: " + "; ".join(failures)) from None
                ctx.exclude = ctx.exclude | {worker.instance_id}
                decode_worker = await self._choose(self.decode_pipeline, ctx, failures)
                served_by["decode"] = decode_worker.instance_id
                announce = True
                self.events.resumed(request_id, worker.instance_id, decode_worker.instance_id, len(generated))
                if self.metrics is not None:
                    self.metrics.resumed.inc()
                log.info("resuming request on another decode worker",
                         extra={"request_id": request_id, "instance_id": decode_worker.instance_id,
                                "num_generated": len(generated)})
            finally:
                # Closing this generator early (stop string, client gone) lands here too:
                # cancelling the call makes the decode worker abort the request.
                if self._calls.get(request_id) is call:
                    del self._calls[request_id]
                call.cancel()
                self.pool.release(worker.instance_id)
