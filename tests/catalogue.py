"""Every metric name the code registers, read from the metrics classes themselves, so that
a renamed metric breaks the alert rule, dashboard and documentation checks."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from cleave.common.kv_handoff import WorkerMetrics
from cleave.expert.metrics import ExpertMetrics
from cleave.kvstore.memory import MemoryBackend
from cleave.kvstore.metrics import KVStoreMetrics
from cleave.router.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parent.parent

# Series that other components expose: Prometheus itself (``up``, ``ALERTS``), every
# Python process (``process_*``) and the Kafka events publisher.
EXTERNAL = {"up", "ALERTS", "ALERTS_FOR_STATE", "process_start_time_seconds", "process_resident_memory_bytes",
            "process_cpu_seconds_total", "cleave_events_sent_total", "cleave_events_dropped_total"}

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


class _StubEngine:
    def stats(self) -> dict[str, float]:
        return {}


def _families(registry: CollectorRegistry) -> list[Metric]:
    return list(registry.collect())


def families() -> dict[str, list[Metric]]:
    """Service -> the metric families its metrics class registers."""
    out = {"router": _families(RouterMetrics().registry)}
    for role in ("prefill", "decode"):
        out[role] = _families(WorkerMetrics(role, f"{role}-0", _StubEngine()).registry)
    out["kvstore"] = _families(KVStoreMetrics(MemoryBackend(1 << 20), "kvstore-0").registry)
    out["expert"] = _families(ExpertMetrics("expert-0", 1).registry)
    return out


def series_names() -> set[str]:
    """Every series name a scrape can show (``_total``, ``_bucket``, ...), plus :data:`EXTERNAL`."""
    names = set(EXTERNAL)
    for service in families().values():
        for family in service:
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names


_KEYWORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "le", "atan2",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGES = re.compile(r"\[[^\]]*\]")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions
    (followed by ``(``), keywords, label names (inside ``{}`` or ``by (...)``) or durations."""
    text = _RANGES.sub("", _STRINGS.sub('""', expr))
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group()
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or name.lower() in _KEYWORDS:
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent or unit of a number: 1e3
        names.add(name)
    return names
