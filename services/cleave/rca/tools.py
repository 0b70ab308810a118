"""What the ops agent, and the LLM through it, may look at: Prometheus (instant and range
PromQL, metric names), the platform's registry in Redis, the scaling decisions list and
recent request-lifecycle events on Kafka.

Prometheus is the one source a diagnosis cannot do without: its failures raise
``PrometheusUnavailable`` (:mod:`cleave.observability.prometheus_api`) with a message
naming the URL and the cause. The others are
context; their readers answer what they could read and record why not in ``errors``."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from typing import Any

from cleave.events.schema import DEFAULT_TOPIC
from cleave.observability.prometheus_api import PrometheusAPI
from cleave.observability.status_lists import DECISIONS_KEY

NUM_EVENTS_PER_PARTITION = 2000


def _number(raw: str) -> float | None:
    value = float(raw)
    return None if math.isnan(value) or math.isinf(value) else value


class Tools:
    """The agent's readers. ``redis_url`` and ``events_bootstrap`` may be empty: that
    context is then left out (and said so in ``errors``)."""

    def __init__(self, prometheus_url: str, redis_url: str = "", events_bootstrap: str = "",
                 events_topic: str = DEFAULT_TOPIC, timeout: float = 10.0) -> None:
        self.prometheus = PrometheusAPI(prometheus_url, timeout=timeout)
        self.prometheus_url = self.prometheus.url
        self.redis_url = redis_url
        self.events_bootstrap = events_bootstrap
        self.events_topic = events_topic
        self.timeout = timeout
        self.errors: list[str] = []

    # -- Prometheus ------------------------------------------------------------------------

    def instant(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """``[{"labels": {...}, "value": float | None}]`` of an instant query at ``at`` (now)."""
        return [{"labels": s.get("metric", {}), "value": _number(s["value"][1])}
                for s in self.prometheus.query(promql, at)]

    def range(self, promql: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """``[{"labels": {...}, "values": [(t, v | None), ...]}]`` of a range query."""
        return [{"labels": s.get("metric", {}), "values": [(float(t), _number(v)) for t, v in s.get("values", [])]}
                for s in self.prometheus.query_range(promql, start, end, step)]

    def metric_names(self, prefix: str = "cleave_") -> list[str]:
        """Names of the metrics Prometheus holds that start with ``prefix``."""
        return [n for n in self.prometheus.metric_names() if n.startswith(prefix)]

    # -- Redis -----------------------------------------------------------------------------

    def _redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url, socket_timeout=3, socket_connect_timeout=3)

    def registry(self) -> list[dict[str, Any]]:
        """Registered instances: role, id, address, load, seconds since the last heartbeat."""
        if not self.redis_url:
            return []
        from cleave.common.registry import Registry

        try:
            client = self._redis()
            try:
                records = Registry(client).list_instances()
            finally:
                client.close()
        except Exception as exc:  # context only: the diagnosis goes on without it
            self.errors.append(f"registry in Redis {self.redis_url}: {exc}")
            return []
        now = time.time()
        return [{"role": r.role, "instance_id": r.instance_id, "address": r.address, "load": r.load,
                 "heartbeat_age_seconds": round(now - r.heartbeat_at, 1) if r.heartbeat_at else None}
                for r in records]

    def scaling_decisions(self, count: int = 10) -> list[dict[str, Any]]:
        """The newest ``count`` entries of ``cleave:scaling:decisions``."""
        if not self.redis_url:
            return []
        try:
            client = self._redis()
            try:
                raws = client.lrange(DECISIONS_KEY, 0, count - 1)
            finally:
                client.close()
        except Exception as exc:
            self.errors.append(f"scaling decisions in Redis {self.redis_url}: {exc}")
            return []
        out = []
        for raw in raws:
            try:
                entry = json.loads(raw)
            except ValueError:
                entry = {"raw": raw.decode(errors="replace")}
            out.append(entry if isinstance(entry, dict) else {"value": entry})
        return out

    # -- Kafka -----------------------------------------------------------------------------

    def recent_events(self, start: float, end: float, deadline_seconds: float = 5.0) -> dict[str, Any]:
        """What the request-lifecycle events between ``start`` and ``end`` say: counts by
        type, by routed instance, and the failures, rejections and resumes (at most 20)."""
        summary: dict[str, Any] = {"count": 0, "by_type": {}, "routed_to": {}, "failed": []}
        if not self.events_bootstrap:
            return summary
        try:
            events = self._read_events(deadline_seconds)
        except Exception as exc:
            self.errors.append(f"events on Kafka {self.events_bootstrap}: {exc}")
            return summary
        in_window = [e for e in events if isinstance(e.get("timestamp"), (int, float)) and start <= e["timestamp"] <= end]
        summary["count"] = len(in_window)
        summary["by_type"] = dict(Counter(e.get("type") for e in in_window))
        summary["routed_to"] = dict(Counter(e.get("target_instance_id") for e in in_window if e.get("type") == "routed"))
        bad = [e for e in in_window if e.get("type") in ("failed", "rejected", "resumed")]
        summary["failed"] = [{k: e.get(k) for k in ("timestamp", "type", "status", "reason", "error",
                                                     "from_instance_id", "to_instance_id") if e.get(k) is not None}
                             for e in bad[-20:]]
        return summary

    def _read_events(self, deadline_seconds: float) -> list[dict[str, Any]]:
        """The last ``NUM_EVENTS_PER_PARTITION`` events of every partition, read without a
        consumer group (nobody's offsets move)."""
        import socket

        from kafka import KafkaConsumer, TopicPartition

        # kafka-python waits out its whole timeout for a broker that is not there at all.
        host, _, port = self.events_bootstrap.split(",")[0].rpartition(":")
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=2).close()
        consumer = KafkaConsumer(bootstrap_servers=self.events_bootstrap.split(","), group_id=None,
                                 enable_auto_commit=False, client_id="cleave-agent",
                                 request_timeout_ms=int(deadline_seconds * 1000) + 1000,
                                 bootstrap_timeout_ms=int(deadline_seconds * 1000))
        try:
            partitions = consumer.partitions_for_topic(self.events_topic) or set()
            if not partitions:
                return []
            assigned = [TopicPartition(self.events_topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            ends = consumer.end_offsets(assigned)
            begins = consumer.beginning_offsets(assigned)
            for tp in assigned:
                consumer.seek(tp, max(begins[tp], ends[tp] - NUM_EVENTS_PER_PARTITION))
            events: list[dict[str, Any]] = []
            stop = time.monotonic() + deadline_seconds
            while time.monotonic() < stop and any(consumer.position(tp) < ends[tp] for tp in assigned):
                for records in consumer.poll(timeout_ms=200).values():
                    for record in records:
                        try:
                            events.append(json.loads(record.value))
                        except ValueError:
                            continue
            return events
        finally:
            consumer.close()
