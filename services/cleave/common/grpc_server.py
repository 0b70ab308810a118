"""The gRPC server every Cleave service runs.

It carries the standard ``grpc.health.v1`` health service and server reflection, allows
messages big enough for KV blocks, and drains gracefully: on SIGTERM or SIGINT it turns
health NOT_SERVING (so that load balancers and routers stop sending work), deregisters
from the registry, lets in-flight calls finish within a grace period, then stops.

Usage::

    server = ServiceServer("127.0.0.1", 50060, [kvstore_pb2.DESCRIPTOR.services_by_name["KVStore"].full_name])
    kvstore_pb2_grpc.add_KVStoreServicer_to_server(servicer, server.server)
    await server.start()
    server.registration = AsyncRegistration(registry, InstanceRecord("kvstore", id, server.address))
    await server.registration.start()
    server.install_signal_handlers()
    await server.wait_for_termination()
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cleave.common.registry import AsyncRegistration, AsyncRegistry, InstanceRecord
from cleave.common.stacks import format_stacks

log = logging.getLogger("cleave.grpc")

# The largest single message: a KV block of a large model is several MiB, and a
# GetBlocks chunk may carry one whole.
MAX_MESSAGE_BYTES = 64 * 2**20
DEFAULT_DRAIN_GRACE_SECONDS = 10.0
# What one drain step beyond the grace period (deregistering, stopping the engine, closing
# clients) may take before the drain logs where it hangs and goes on.
DRAIN_STEP_SECONDS = 15.0


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for a client channel talking to a Cleave server."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def advertised_address(host: str, port: int, advertise: str = "") -> str:
    """The ``host:port`` other services should dial: ``advertise`` if set, else the
    bind host, else (for a wildcard bind) this machine's resolved hostname."""
    if advertise:
        return advertise
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health`` whose Watch streams end once a drain has announced
    NOT_SERVING. grpcio's own keeps them open, and every open stream would then hold the
    drain for its whole grace period."""

    def __init__(self) -> None:
        self._status = {"": _SERVING}
        self._changed = asyncio.Condition()
        self.draining = False

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:
        last = None
        while True:
            async with self._changed:
                while (status := self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)) == last:
                    if self.draining:
                        return
                    await self._changed.wait()
            await context.write(health_pb2.HealthCheckResponse(status=status))
            last = status

    async def set(self, service: str, status: int) -> None:
        """Set one service's status (ignored once draining)."""
        async with self._changed:
            if not self.draining:
                self._status[service] = status
                self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING, for good."""
        async with self._changed:
            self.draining = True
            for service in self._status:
                self._status[service] = _NOT_SERVING
            self._changed.notify_all()


class ServiceServer:
    """A ``grpc.aio`` server with health, reflection and graceful drain.

    Add servicers to ``self.server`` before :meth:`start`. ``port`` 0 binds a free
    port; :attr:`port` holds the bound one afterwards.
    """

    def __init__(
        self,
        host: str,
        port: int,
        service_names: Sequence[str],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        drain_grace: float = DEFAULT_DRAIN_GRACE_SECONDS,
        advertise: str = "",
    ) -> None:
        self.service_names = list(service_names)
        self.drain_grace = drain_grace
        self.server = grpc.aio.server(options=channel_options(max_message_bytes))
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.host = host
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.address = advertised_address(host, self.port, advertise)
        self.registration: AsyncRegistration | None = None
        self._after_stop: list[Callable[[], Awaitable[None]]] = []
        self._on_drain: list[Callable[[], None]] = []
        self._drain_task: asyncio.Task | None = None
        self.drain_overruns: list[str] = []  # the drain steps that did not finish in time

    async def start(self) -> None:
        """Start serving and report SERVING for the server and each service."""
        await self.server.start()
        for name in ("", *self.service_names):
            await self.health.set(name, _SERVING)
        log.info("grpc serving", extra={"address": self.address, "services": self.service_names})

    async def register(self, registry: AsyncRegistry, record: InstanceRecord, ttl: float) -> AsyncRegistration:
        """Register ``record`` (heartbeated until the drain, which deregisters it)."""
        self.registration = AsyncRegistration(registry, record, ttl=ttl)
        await self.registration.start()
        return self.registration

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` as the drain begins: a servicer whose calls outlive their
        requests (a session) ends them once its requests are done."""
        self._on_drain.append(callback)

    def after_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` once the server has stopped (all in-flight calls done)."""
        self._after_stop.append(callback)

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, deregister, finish in-flight calls within ``grace`` seconds, stop.
        Idempotent: a second call waits for the first."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain(self.drain_grace if grace is None else grace))
        await asyncio.shield(self._drain_task)

    async def _drain(self, grace: float) -> None:
        log.info("draining", extra={"address": self.address, "grace_s": grace})
        await self.health.enter_graceful_shutdown()
        for callback in self._on_drain:
            callback()
        if self.registration is not None:
            try:
                await self._bounded("deregister", self.registration.stop(deregister=True), DRAIN_STEP_SECONDS)
            except Exception as exc:  # the record expires on its own within its TTL
                log.warning("deregister failed", extra={"error": str(exc)})
        await self._bounded("stop", self.server.stop(grace), grace + DRAIN_STEP_SECONDS)
        for callback in self._after_stop:
            try:
                await self._bounded(getattr(callback, "__qualname__", "after-stop"), callback(), DRAIN_STEP_SECONDS)
            except Exception:
                log.exception("after-stop callback failed")
        log.info("stopped", extra={"address": self.address})

    async def _bounded(self, step: str, awaitable: Awaitable[None], seconds: float) -> None:
        """Await one drain step for at most ``seconds``: a process asked to stop must stop
        (Kubernetes kills it after its grace period anyway), and a step that hangs is
        logged with every task's and thread's stack, taken while it still hangs, so the
        report names the await it hangs on. The step runs in the drain's own task, in
        order (deregistering right after health turns NOT_SERVING)."""
        loop = asyncio.get_running_loop()
        stacks: list[str] = []
        snapshot = loop.call_later(seconds, lambda: stacks.append(format_stacks(loop)))
        try:
            async with asyncio.timeout(seconds + 0.05):  # after the snapshot
                await awaitable
        except TimeoutError:
            self.drain_overruns.append(step)
            log.error("drain step overran; going on", extra={"address": self.address, "step": step, "seconds": seconds,
                                                             "stacks": stacks[0] if stacks else ""})
        finally:
            snapshot.cancel()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain; a second signal during a drain stops at once."""
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if self._drain_task is None:
                log.info("signal received, draining", extra={"signal": signal.Signals(signum).name})
                self._drain_task = asyncio.ensure_future(self._drain(self.drain_grace))
            else:
                log.warning("second signal, stopping now", extra={"signal": signal.Signals(signum).name})
                asyncio.ensure_future(self.server.stop(0))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    async def wait_for_termination(self) -> None:
        """Return once the server has stopped and a drain (if any) has finished."""
        await self.server.wait_for_termination()
        if self._drain_task is not None:
            await asyncio.shield(self._drain_task)
