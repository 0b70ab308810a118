"""The router's side of the events: ``RequestEvents`` turns what the router sees into
schema events (``events.schema``) on an ``EventPublisher``; ``RequestLifecycle`` follows
one admitted request so that it ends with exactly one ``finished`` or ``failed`` and
reports its first token once.

The sequence of one request (docs/events.md): ``arrived``, then ``rejected`` (the end)
or ``admitted``; then ``routed`` (prefill), ``prefill_done``, ``routed`` (decode),
``first_token``, any ``resumed`` (each after the ``routed`` decode of its new worker), and
``finished`` or ``failed``. The router emits ``prefill_done`` from the prefill worker's
answer, so that no worker needs a Kafka client."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cleave.events.publisher import EventPublisher
from cleave.events.schema import make_event

log = logging.getLogger("cleave.events")


class RequestEvents:
    """Emits the events of one service (``role``, ``instance_id``); a no-op without a publisher."""

    def __init__(self, publisher: EventPublisher | None, role: str = "router", instance_id: str = "") -> None:
        self.publisher = publisher
        self.role = role
        self.instance_id = instance_id

    @property
    def enabled(self) -> bool:
        return self.publisher is not None

    def emit(self, event_type: str, request_id: str, **fields: Any) -> None:
        """Publish one event; never raises into the request it describes."""
        if self.publisher is None:
            return
        try:
            self.publisher.publish(make_event(event_type, request_id, self.role, self.instance_id, **fields))
        except Exception:
            log.exception("cannot build event", extra={"request_id": request_id, "type": event_type})

    def arrived(self, request_id: str, prompt_tokens: int | None, model: str | None) -> None:
        self.emit("arrived", request_id, prompt_tokens=prompt_tokens, model=model)

    def rejected(self, request_id: str, error) -> None:
        """``error``: the ``APIError`` answered."""
        self.emit("rejected", request_id, status=error.status_code, reason=error.code or error.type)

    def routed(self, request_id: str, role: str, chosen, pipeline) -> None:
        self.emit("routed", request_id, target_role=role, target_instance_id=chosen.instance_id,
                  pipeline=pipeline.spec, score=pipeline.normalized_score(chosen))

    def prefill_done(self, request_id: str, instance_id: str, cached_tokens: int, seconds: float) -> None:
        self.emit("prefill_done", request_id, prefill_instance_id=instance_id, cached_tokens=cached_tokens,
                  prefill_seconds=seconds)

    def resumed(self, request_id: str, from_instance_id: str, to_instance_id: str, num_generated: int) -> None:
        self.emit("resumed", request_id, from_instance_id=from_instance_id, to_instance_id=to_instance_id,
                  num_generated=num_generated)

    def request(self, request_id: str, arrival: float | None = None) -> "RequestLifecycle":
        """Follow one admitted request; ``arrival`` is a ``time.perf_counter()`` reading."""
        return RequestLifecycle(self, request_id, time.perf_counter() if arrival is None else arrival)


NO_EVENTS = RequestEvents(None)


def events_of(engine) -> RequestEvents:
    """The event emitter an engine client carries (``RemoteEngineClient.events``); the
    front end emits through the same one. Engines without one emit nothing."""
    return getattr(engine, "events", None) or NO_EVENTS


def failure_status(exc: BaseException) -> int:
    """The HTTP status a front end answers for an engine failure."""
    from cleave.engine.outputs import ServiceUnavailableError

    if isinstance(exc, ValueError):
        return 400
    if isinstance(exc, ServiceUnavailableError):
        return 503
    return 500


class RequestLifecycle:
    """One admitted request, from ``admitted`` to its one terminal event."""

    __slots__ = ("events", "request_id", "arrival", "has_first_token", "ended")

    def __init__(self, events: RequestEvents, request_id: str, arrival: float) -> None:
        self.events = events
        self.request_id = request_id
        self.arrival = arrival
        self.has_first_token = False
        self.ended = False

    def admitted(self) -> None:
        self.events.emit("admitted", self.request_id)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens > 0 and not self.has_first_token:
            self.has_first_token = True
            self.events.emit("first_token", self.request_id, ttft_seconds=time.perf_counter() - self.arrival)

    def finished(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if not self.ended:
            self.ended = True
            self.events.emit("finished", self.request_id, finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, e2e_seconds=time.perf_counter() - self.arrival)

    def failed(self, exc: BaseException) -> None:
        """The engine raised ``exc``; a cancellation is the caller leaving, reported by ``closed``."""
        if self.ended or isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
            return
        self.ended = True
        error = str(exc) or "the engine ended the request without an output"
        self.events.emit("failed", self.request_id, error=error, status=failure_status(exc))

    def closed(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The request was released; if nothing ended it, the caller left: ``finished`` / abort."""
        self.finished("abort", prompt_tokens, completion_tokens)
