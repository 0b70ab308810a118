"""The router's side of ``cleave.v1.Decode/Session``: one call per decode worker carries
every request the router runs there, and each batch that comes back is shared out to the
requests it names (docs/prefill-decode.md, "Sessions").

A request on a session reads like its own ``Decode`` call: :meth:`SessionStream.read`
gives its items, then ``grpc.aio.EOF``; it raises the ``grpc.RpcError`` its call would
have ended with (a ``SessionError`` carries the code, the message and the blamed cause);
:meth:`SessionStream.cancel` makes a pending or later read raise ``CancelledError`` and
tells the worker to abort the request. A session that breaks fails every request on it
with the break's status, so each one fails over as a broken ``Decode`` call would."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from cleave.common.wire import FAILURE_CAUSE_KEY
from cleave.protogen.cleave.v1 import decode_pb2, decode_pb2_grpc

log = logging.getLogger("cleave.router")

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_CANCELLED = object()  # put in a request's inbox by SessionStream.cancel


def rpc_error(code: grpc.StatusCode, details: str, cause: str = "") -> grpc.aio.AioRpcError:
    """The error a gRPC call ending with ``code`` would raise, blaming ``cause`` if given."""
    trailing = grpc.aio.Metadata((FAILURE_CAUSE_KEY, cause)) if cause else grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


class SessionStream:
    """One request's items on a session."""

    __slots__ = ("session", "request_id", "inbox", "timer", "done", "ended")

    def __init__(self, session: "DecodeSession", request_id: str, timeout: float) -> None:
        self.session = session
        self.request_id = request_id
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.done = False  # nothing more will come in: the last item, an error, a cancel
        self.ended = False  # the worker has nothing running for it, or has been told to stop
        # A deadline like the one a Decode call would carry: a worker that hangs fails
        # the request DEADLINE_EXCEEDED and the router moves it on.
        self.timer = asyncio.get_running_loop().call_later(
            timeout, self.inbox.put_nowait,
            rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of the decode stream within {timeout:g} s"))

    async def read(self):
        """The next item, or ``grpc.aio.EOF`` after the last one."""
        if self.done and self.inbox.empty():
            return grpc.aio.EOF
        item = await self.inbox.get()
        if item is _CANCELLED:
            raise asyncio.CancelledError()
        if isinstance(item, BaseException):
            # The worker may still be running it (a deadline): cancel() tells it to stop.
            self._end()
            raise item
        if item.finish_reason:
            self.ended = True
            self._end()
        return item

    def cancel(self) -> None:
        """Abort the request, on the worker too unless it ended there. Idempotent."""
        if not self.ended:
            self.ended = True
            self._end()
            self.session.cancel(self.request_id)
            self.inbox.put_nowait(_CANCELLED)

    def _end(self) -> None:
        self.done = True
        self.timer.cancel()
        self.session.forget(self.request_id)


class DecodeSession:
    """One ``Session`` call to one decode worker."""

    def __init__(self, address: str, channel: grpc.aio.Channel, on_closed) -> None:
        self.address = address
        self.closed: grpc.RpcError | None = None
        self._outgoing: asyncio.Queue = asyncio.Queue()
        self._streams: dict[str, SessionStream] = {}
        self._on_closed = on_closed
        self._call = decode_pb2_grpc.DecodeStub(channel).Session(self._requests())
        self._reader = asyncio.create_task(self._read(), name=f"decode-session-{address}")

    def start(self, request: decode_pb2.DecodeRequest, timeout: float) -> SessionStream:
        if self.closed is not None:
            raise self.closed
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already running")
        stream = SessionStream(self, request.request_id, timeout)
        self._streams[request.request_id] = stream
        self._outgoing.put_nowait(decode_pb2.SessionRequest(start=request))
        return stream

    def cancel(self, request_id: str) -> None:
        if self.closed is None:
            self._outgoing.put_nowait(decode_pb2.SessionRequest(cancel=request_id))

    def forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def close(self) -> None:
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[decode_pb2.SessionRequest]:
        while True:
            yield await self._outgoing.get()

    async def _read(self) -> None:
        try:
            async for batch in self._call:
                streams = self._streams
                for item in batch.items:
                    stream = streams.get(item.request_id)
                    if stream is not None:
                        stream.inbox.put_nowait(item)
                for error in batch.errors:
                    stream = streams.get(error.request_id)
                    if stream is not None:
                        stream.inbox.put_nowait(rpc_error(STATUS_CODES.get(error.code, grpc.StatusCode.UNKNOWN),
                                                          error.message, error.failure_cause))
            closed: grpc.RpcError = rpc_error(grpc.StatusCode.UNAVAILABLE, "the decode worker ended the session")
        except grpc.RpcError as exc:
            closed = exc
        except asyncio.CancelledError:
            closed = rpc_error(grpc.StatusCode.CANCELLED, "the router closed the session")
        except Exception as exc:  # a bug here must not leave requests waiting forever
            log.exception("decode session reader failed", extra={"address": self.address})
            closed = rpc_error(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        self.closed = closed
        for stream in list(self._streams.values()):
            stream.inbox.put_nowait(closed)
        self._streams.clear()
        self._on_closed(self)


class DecodeSessions:
    """The open session of each decode worker, opened on first use and again after one
    breaks."""

    def __init__(self, channel) -> None:
        self._channel = channel  # address -> grpc.aio.Channel
        self._sessions: dict[str, DecodeSession] = {}

    def start(self, address: str, request: decode_pb2.DecodeRequest, timeout: float) -> SessionStream:
        session = self._sessions.get(address)
        if session is None or session.closed is not None:
            session = self._sessions[address] = DecodeSession(address, self._channel(address), self._closed)
        return session.start(request, timeout)

    def _closed(self, session: DecodeSession) -> None:
        if self._sessions.get(session.address) is session:
            del self._sessions[session.address]

    @property
    def num_open(self) -> int:
        return len(self._sessions)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(session.close() for session in sessions))
