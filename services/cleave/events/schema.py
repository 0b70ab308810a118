"""The request-lifecycle event schema, version 1 (docs/events.md).

Every event is one JSON object, keyed on Kafka by its ``request_id`` so that all events
of a request land on one partition, in order. The envelope is the same for every type:

- ``schema_version``: 1; a consumer refuses versions it does not know.
- ``type``: one of :data:`EVENT_FIELDS`.
- ``request_id``: the id the client sees (``x-request-id``, the response ``id``).
- ``timestamp``: unix seconds (float) when the emitter saw the event happen.
- ``role`` and ``instance_id``: the service that emitted it (today always the router).

The fields each type adds are listed in :data:`EVENT_FIELDS`. Fields are only ever added
within a version; renaming or removing one bumps ``schema_version``."""

from __future__ import annotations

import time
from typing import Any

SCHEMA_VERSION = 1
DEFAULT_TOPIC = "cleave.requests.v1"
ENVELOPE = ("schema_version", "type", "request_id", "timestamp", "role", "instance_id")

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    # The router has read and tokenized the request (prompt_tokens None if it could not).
    "arrived": ("prompt_tokens", "model"),
    # Passed every check; handed to the engine. Exactly one of admitted / rejected follows arrived.
    "admitted": (),
    # Refused before generating: the HTTP status and the error code answered.
    "rejected": ("status", "reason"),
    # A worker chosen for a stage: role prefill|decode, its instance, the pipeline spec and
    # the chosen worker's weighted score in [0, 1] (None for a pipeline without scorers).
    "routed": ("target_role", "target_instance_id", "pipeline", "score"),
    # The prefill worker answered: prompt tokens found cached, seconds from the prefill call
    # to its answer (which carries the first token).
    "prefill_done": ("prefill_instance_id", "cached_tokens", "prefill_seconds"),
    # The first generated token reached the router: seconds since the request arrived.
    "first_token": ("ttft_seconds",),
    # Terminal after admitted: the finish reason (stop, length, abort: the client left).
    "finished": ("finish_reason", "prompt_tokens", "completion_tokens", "e2e_seconds"),
    # Terminal after admitted: the request failed; the error and the status answered.
    "failed": ("error", "status"),
    # A decode worker died mid-stream; the request continues on another.
    "resumed": ("from_instance_id", "to_instance_id", "num_generated"),
}

TERMINAL = frozenset({"rejected", "finished", "failed"})


def make_event(event_type: str, request_id: str, role: str, instance_id: str, **fields: Any) -> dict[str, Any]:
    """One event of ``event_type`` with exactly that type's fields."""
    expected = EVENT_FIELDS[event_type]
    if set(fields) != set(expected):
        raise ValueError(f"{event_type} takes fields {sorted(expected)}, got {sorted(fields)}")
    return {"schema_version": SCHEMA_VERSION, "type": event_type, "request_id": request_id,
            "timestamp": time.time(), "role": role, "instance_id": instance_id, **fields}


def check_event(event: Any) -> list[str]:
    """What is wrong with a received event against this schema; empty when nothing."""
    if not isinstance(event, dict):
        return ["not a JSON object"]
    if event.get("schema_version") != SCHEMA_VERSION:
        return [f"schema_version {event.get('schema_version')!r} is not {SCHEMA_VERSION}"]
    problems = [f"missing {name}" for name in ENVELOPE if name not in event]
    fields = EVENT_FIELDS.get(event.get("type"))
    if fields is None:
        return problems + [f"unknown type {event.get('type')!r}"]
    problems += [f"missing {name}" for name in fields if name not in event]
    if not isinstance(event.get("timestamp"), (int, float)):
        problems.append("timestamp is not a number")
    return problems
