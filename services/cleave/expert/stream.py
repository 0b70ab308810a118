"""``RunExperts`` over a plain TCP stream: the data path between the engines and the
expert replicas, beside the gRPC service that stays the control path and the fallback.

A decode step makes one call per MoE layer, each carrying a few rows, so a call's fixed
cost is what a token pays: a unary ``grpc.aio`` call cost the replica about 0.5 ms of CPU
and the blocking client about 0.8 ms before either touched a tensor, more than the
experts' own work at small batches. Here a call is one write and one read on a
connection kept open, and the messages are the same ``RunExpertsRequest`` and
``RunExpertsResponse`` protobufs, checked by the same code.

Framing (little-endian): a 5-byte header, ``uint32`` payload length and ``uint8`` kind,
then the payload. A caller sends kind 0 (a serialized ``RunExpertsRequest``) and reads
one reply before sending the next call on that connection: kind 0 (a serialized
``RunExpertsResponse``) or kind 1 (an error: a gRPC status code name, a newline, the
message, UTF-8). A replica advertises the stream's ``host:port`` as the
``stream_address`` capability of its registry record; callers that find one use it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from cleave.common.grpc_server import MAX_MESSAGE_BYTES
from cleave.protogen.cleave.v1 import expert_pb2 as pb

log = logging.getLogger("cleave.expert.stream")

HEADER = struct.Struct("<IB")
CALL = 0  # a request; in a reply, a response
ERROR = 1  # a reply only: "CODE_NAME\nmessage"


class InvalidRequest(ValueError):
    """A call the replica refuses (INVALID_ARGUMENT), whatever the transport."""


def frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(len(payload), kind) + payload


def error_frame(code: grpc.StatusCode, message: str) -> bytes:
    return frame(ERROR, f"{code.name}\n{message}".encode())


class StreamServer:
    """The replica's side: answers each connection's calls in order with ``run``, which
    raises :class:`InvalidRequest` for a call it refuses."""

    def __init__(self, run: Callable[[pb.RunExpertsRequest], Awaitable[pb.RunExpertsResponse]],
                 host: str, port: int, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.run = run
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, bool] = {}  # writer -> a call is being answered
        self._handlers: set[asyncio.Task] = set()
        self._closing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, let the calls being answered finish, close every connection.
        A caller whose connection closes retries elsewhere (UNAVAILABLE)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer, busy in list(self._connections.items()):
            if not busy:  # waiting for a call: the handler sees end of stream and returns
                writer.close()
        if self._handlers:
            await asyncio.wait(set(self._handlers))

    def abort(self) -> None:
        """Drop every connection at once, as a crashed process would."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.close()
            return
        self._handlers.add(asyncio.current_task())
        self._connections[writer] = False
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self._closing:
                length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
                if kind != CALL or length > self.max_message_bytes:
                    # The stream cannot be trusted past a bad header: answer, then hang up.
                    code = grpc.StatusCode.INVALID_ARGUMENT if kind != CALL else grpc.StatusCode.RESOURCE_EXHAUSTED
                    problem = f"unknown frame kind {kind}" if kind != CALL else \
                        f"a call of {length} bytes is over the limit of {self.max_message_bytes}"
                    writer.write(error_frame(code, problem))
                    break
                payload = await reader.readexactly(length)
                self._connections[writer] = True
                try:
                    writer.write(await self._answer(payload))
                finally:
                    self._connections[writer] = False
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the caller hung up, or close() did
        finally:
            self._connections.pop(writer, None)
            self._handlers.discard(asyncio.current_task())
            writer.close()

    async def _answer(self, payload: bytes) -> bytes:
        try:
            request = pb.RunExpertsRequest.FromString(payload)
        except DecodeError as exc:
            return error_frame(grpc.StatusCode.INVALID_ARGUMENT, f"not a RunExpertsRequest: {exc}")
        try:
            response = await self.run(request)
        except InvalidRequest as exc:
            return error_frame(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            log.exception("RunExperts over the stream failed")
            return error_frame(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return frame(CALL, response.SerializeToString())


class StreamCallError(grpc.RpcError):
    """A failed call over the stream, with the status code a gRPC call would have had,
    so that callers fail over the same way for either transport."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class StreamClient:
    """The caller's side, blocking, for the engine thread: ``call`` sends one request
    and waits for its reply within ``timeout`` seconds. A connection serves one call at
    a time; calls at once from several threads each take their own."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"stream address must be host:port, not {address!r}")
        self.address = address
        self._target = (host.strip("[]"), int(port))
        self._idle: list[socket.socket] = []

    def call(self, request: pb.RunExpertsRequest, timeout: float) -> pb.RunExpertsResponse:
        deadline = time.monotonic() + timeout
        data = frame(CALL, request.SerializeToString())
        while True:
            sock, reused = None, False
            try:
                try:
                    sock, reused = self._idle.pop(), True
                except IndexError:  # none idle (another thread may have just taken the last)
                    sock, reused = self._connect(max(deadline - time.monotonic(), 0.001)), False
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(data)
                length, kind = HEADER.unpack(self._receive(sock, HEADER.size, deadline))
                payload = self._receive(sock, length, deadline)
                break
            except TimeoutError:
                self._discard(sock)
                raise StreamCallError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      f"no reply from {self.address} in {timeout} s") from None
            except OSError as exc:
                self._discard(sock)
                if reused and time.monotonic() < deadline:
                    # A kept connection the replica closed while it sat idle (a drain, a
                    # restart): the call never ran, and running it twice would be harmless
                    # anyway, so it goes again on a new connection.
                    continue
                raise StreamCallError(grpc.StatusCode.UNAVAILABLE, f"{self.address}: {exc}") from None
        if kind == CALL:
            self._idle.append(sock)
            try:
                return pb.RunExpertsResponse.FromString(payload)
            except DecodeError as exc:
                raise StreamCallError(grpc.StatusCode.INTERNAL, f"{self.address} sent a bad reply: {exc}") from None
        self._discard(sock)  # the replica may hang up after an error: start afresh
        name, _, message = bytes(payload).decode(errors="replace").partition("\n")
        code = grpc.StatusCode.__members__.get(name, grpc.StatusCode.UNKNOWN)
        raise StreamCallError(code, message)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(self._target, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    @staticmethod
    def _receive(sock: socket.socket, size: int, deadline: float) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            count = sock.recv_into(view[got:])
            if count == 0:
                raise ConnectionResetError("the replica closed the connection")
            got += count
        return data

    @staticmethod
    def _discard(sock: socket.socket | None) -> None:
        if sock is not None:
            sock.close()
