"""The Redis lists the router's status page shows (docs/observability.md): scaling decisions,
written by the operator, and diagnoses, written by the ops agent. Each entry is a JSON
object; the newest comes first and the oldest fall off past ``KEPT``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

DECISIONS_KEY = "cleave:scaling:decisions"
DIAGNOSES_KEY = "cleave:diagnoses"
KEPT = 100


def push(redis_url: str, key: str, entry: Mapping[str, Any], *, timeout: float = 3.0) -> str | None:
    """LPUSH ``entry`` onto ``key`` and keep the newest ``KEPT``. Best effort, as the lists
    only feed the page: the error text when Redis cannot take it, never raised."""
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            client.lpush(key, json.dumps(dict(entry)))
            client.ltrim(key, 0, KEPT - 1)
        finally:
            client.close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure leaves the list as it was
        return f"Redis {redis_url}: {exc}"
