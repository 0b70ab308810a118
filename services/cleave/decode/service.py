"""The ``cleave.v1.Decode`` service: continue a request from its tokens so far and the
KV blocks in the store, streaming what it generates; one request per ``Decode`` call,
or many on one ``Session`` call (docs/prefill-decode.md, "Sessions")."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from typing import AsyncIterator

import grpc

from cleave.common.kv_handoff import RequestFailed, WorkerServer, request_tokens
from cleave.common.wire import FINISH_REASONS, params_from_proto
from cleave.engine.async_engine import EngineDeadError, EngineStepError
from cleave.protogen.cleave.v1 import decode_pb2 as pb
from cleave.protogen.cleave.v1 import decode_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.decode")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decode"].full_name


def session_error(request_id: str, failure: RequestFailed) -> pb.SessionError:
    """How a request on a session ended: what its ``Decode`` call would have ended with."""
    return pb.SessionError(request_id=request_id, code=failure.code.value[0], message=failure.message,
                           failure_cause=failure.cause)


# What a session's requests and its reader tell the session's writer, besides items and errors.
_REQUEST_DONE = object()
_REQUESTS_ENDED = object()  # the router half-closed: no more starts
_DRAINING = object()


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, server: "DecodeServer") -> None:
        self.server = server
        self.draining = False
        self._sessions: set[asyncio.Queue] = set()

    def begin_drain(self) -> None:
        """No new requests on sessions; each session ends once its requests are done."""
        self.draining = True
        for outbox in self._sessions:
            outbox.put_nowait(_DRAINING)

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        try:
            async with aclosing(self._decode(request)) as items:
                async for item in items:
                    yield item
        except RequestFailed as exc:
            await exc.abort(context)

    async def Session(self, request_iterator, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SessionResponse]:
        # Each request runs in a task of its own and puts what it has in one outbox; the
        # handler sends whatever piled up while the previous batch was written, so the
        # messages per step do not grow with the requests.
        outbox: asyncio.Queue = asyncio.Queue()
        running: dict[str, asyncio.Task] = {}
        self._sessions.add(outbox)
        if self.draining:
            outbox.put_nowait(_DRAINING)

        async def run(request: pb.DecodeRequest) -> None:
            try:
                async with aclosing(self._decode(request)) as items:
                    async for item in items:
                        outbox.put_nowait(item)
            except RequestFailed as exc:
                outbox.put_nowait(session_error(request.request_id, exc))
            except Exception as exc:
                log.exception("decode request on a session failed", extra={"request_id": request.request_id})
                outbox.put_nowait(session_error(request.request_id, RequestFailed(
                    grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")))
            finally:
                if running.get(request.request_id) is asyncio.current_task():
                    del running[request.request_id]
                outbox.put_nowait(_REQUEST_DONE)

        async def read_requests() -> None:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind == "start":
                    request_id = message.start.request_id
                    if self.draining:
                        outbox.put_nowait(session_error(request_id, RequestFailed(
                            grpc.StatusCode.UNAVAILABLE, "this decode worker is draining")))
                    elif request_id in running:
                        outbox.put_nowait(session_error(request_id, RequestFailed(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"request id {request_id!r} is already running on this session")))
                    else:
                        running[request_id] = asyncio.create_task(run(message.start), name=f"decode-{request_id}")
                elif kind == "cancel":
                    task = running.pop(message.cancel, None)
                    if task is not None:
                        task.cancel()
            outbox.put_nowait(_REQUESTS_ENDED)

        reader = asyncio.create_task(read_requests(), name="decode-session-reader")
        no_more_requests = False
        try:
            while True:
                entries = [await outbox.get()]
                while not outbox.empty():
                    entries.append(outbox.get_nowait())
                batch = pb.SessionResponse()
                for entry in entries:
                    if isinstance(entry, pb.DecodeResponse):
                        batch.items.append(entry)
                    elif isinstance(entry, pb.SessionError):
                        batch.errors.append(entry)
                    elif entry is _DRAINING or entry is _REQUESTS_ENDED:
                        no_more_requests = True
                if batch.items or batch.errors:
                    yield batch
                # What a request put in while the batch was written goes out before the end.
                if no_more_requests and not running and outbox.empty():
                    return
        finally:
            self._sessions.discard(outbox)
            tasks = [reader, *running.values()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _decode(self, request: pb.DecodeRequest) -> AsyncIterator[pb.DecodeResponse]:
        """One request's items; raises :class:`RequestFailed`. Closing it early (the
        caller went away) aborts the engine request and frees its blocks."""
        server = self.server
        metrics = server.metrics
        engine = server.engine.engine
        started = time.perf_counter()
        try:
            token_ids = request_tokens(request.request_id, request.token_ids,
                                       "send the prompt and the tokens generated so far")
            params = params_from_proto(request.params)
            engine.validate(token_ids, params, request.num_generated)
            hashes = engine.block_hashes(token_ids)
            given = list(request.block_hashes)
            if given != hashes[: len(given)]:
                raise ValueError(
                    "block_hashes do not match token_ids on this worker (another model, dtype or block size, "
                    "or tokens that are not the ones prefilled)"
                )
            stores = server.handoff.resolve(request.kvstore_targets)
        except ValueError as exc:
            metrics.requests.labels(outcome="invalid").inc()
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

        # Named blocks are known to be stored; without names the index is asked for all.
        wanted = hashes[: len(given)] if given else hashes
        fetched = await server.handoff.import_prefix(server.engine, wanted, token_ids, stores)
        if fetched is not None:
            metrics.count_transfer("fetched", fetched)

        metrics.prompt_tokens.inc(len(token_ids))
        outcome = "cancelled"
        first = True
        stream = server.engine.generate(request.request_id, token_ids, params, num_output_tokens=request.num_generated)
        try:
            async for output in stream:
                metrics.generated_tokens.inc(len(output.new_token_ids))
                item = pb.DecodeResponse(
                    request_id=request.request_id,
                    token_ids=output.new_token_ids,
                    logprobs=output.new_logprobs,
                    finish_reason=FINISH_REASONS[output.finish_reason] if output.finished else 0,
                )
                if first:
                    metrics.cached_tokens.inc(output.num_cached_tokens)
                    item.num_cached_tokens = output.num_cached_tokens
                    first = False
                if output.finished:
                    outcome = "ok"  # the caller may close the call as soon as it has the last token
                yield item
            outcome = "ok"
        except ValueError as exc:
            outcome = "invalid"
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except (EngineDeadError, EngineStepError) as exc:
            outcome = "error"
            raise RequestFailed.from_engine_error(exc) from None
        finally:
            # A client that goes away cancels the call; closing the stream aborts the
            # engine request and frees its blocks.
            await stream.aclose()
            metrics.requests.labels(outcome=outcome).inc()
            metrics.request_seconds.observe(time.perf_counter() - started)


class DecodeServer(WorkerServer):
    """A running decode worker: ``await start()``, then ``await drain()`` (or a signal)."""

    service_name = SERVICE_NAME

    def add_servicer(self, server: grpc.aio.Server) -> None:
        self.servicer = DecodeServicer(self)
        pb_grpc.add_DecodeServicer_to_server(self.servicer, server)
        self.grpc.on_drain(self.servicer.begin_drain)

    def capabilities(self) -> dict[str, object]:
        return {"sessions": True}  # routers that know Session use it; older ones call Decode

    def load(self) -> dict[str, float]:
        return {**super().load(), "num_kv_blocks": self.engine.stats()["num_kv_blocks"]}
