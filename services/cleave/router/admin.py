"""Router admin routes for observability: ``GET /admin/prometheus-targets``, Prometheus'
HTTP service discovery fed from the registry the router already reads.

One target group per registered instance that serves ``/metrics``: workers (prefill,
decode, kvstore, expert) advertise ``metrics_port`` in their capabilities and are
scraped at their gRPC host on that port; a router advertises ``http`` (``host:port``),
where it serves ``/metrics`` beside the API. Labels: ``role``, ``instance_id`` and,
where the instance serves one, ``model`` (the model folder's basename)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, Iterable

from cleave.common.registry import InstanceRecord

UNSPECIFIED_HOSTS = ("", "0.0.0.0", "::", "[::]")


def _host_of(address: str) -> str:
    host, _, _ = address.rpartition(":")
    return host


def metrics_target(record: InstanceRecord) -> str | None:
    """``host:port`` where ``record`` serves ``/metrics``; None when it does not."""
    caps = record.capabilities
    if caps.get("metrics_port"):
        host, port = _host_of(record.address), int(caps["metrics_port"])
    elif record.role == "router" and caps.get("http"):
        host, _, port = str(caps["http"]).rpartition(":")
        if host in UNSPECIFIED_HOSTS:
            host = _host_of(record.address)
    else:
        return None
    if host in UNSPECIFIED_HOSTS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def target_group(record: InstanceRecord) -> dict[str, Any] | None:
    """One HTTP SD target group for ``record``, or None when it has no metrics."""
    target = metrics_target(record)
    if target is None:
        return None
    labels = {"role": record.role, "instance_id": record.instance_id}
    if model := str(record.capabilities.get("model", "")):
        labels["model"] = PurePath(model).name
    return {"targets": [target], "labels": labels}


def prometheus_targets(records: Iterable[InstanceRecord]) -> list[dict[str, Any]]:
    """The HTTP SD document: target groups ordered by role, then instance id."""
    groups = (target_group(r) for r in sorted(records, key=lambda r: (r.role, r.instance_id)))
    return [group for group in groups if group is not None]


def add_prometheus_targets_route(app, pool) -> None:
    """``GET /admin/prometheus-targets`` on ``app``, from ``pool.records`` (the registry
    as last read, the router's own record included)."""

    @app.get("/admin/prometheus-targets")
    async def prometheus_http_sd():
        return prometheus_targets(r for records in pool.records.values() for r in records)
