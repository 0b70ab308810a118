"""Counters that the engine keeps itself (``LLMEngine.stats()``), exposed as Prometheus
counters at scrape time, so that the engine loop never touches a metrics library."""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

#: Metric name (after the role prefix, before ``_total``), help, key of ``stats()``.
ENGINE_COUNTERS = (
    ("preemptions", "Sequences preempted (recomputed later) because KV blocks ran out", "num_preemptions"),
    ("engine_steps", "Engine steps that ran a batch", "num_steps"),
    ("batched_sequences", "Sequences scheduled, summed over steps (÷ steps: mean batch size)", "num_scheduled_seqs"),
    ("batched_tokens", "Tokens computed, summed over steps (÷ steps: mean tokens per step)", "num_scheduled_tokens"),
    ("prefix_cache_queries", "Blocks looked up in the engine's own prefix cache", "prefix_cache_queries"),
    ("prefix_cache_hits", "Blocks found in the engine's own prefix cache", "prefix_cache_hits"),
)


class EngineStatsCollector(Collector):
    """``<prefix>preemptions_total`` and the other :data:`ENGINE_COUNTERS`, read from ``stats``."""

    def __init__(self, prefix: str, stats: Callable[[], Mapping[str, float]]) -> None:
        self.prefix = prefix
        self.stats = stats

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.prefix + name, doc) for name, doc, _ in ENGINE_COUNTERS]

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.stats()
        for name, doc, key in ENGINE_COUNTERS:
            yield CounterMetricFamily(self.prefix + name, doc, value=stats.get(key, 0))
