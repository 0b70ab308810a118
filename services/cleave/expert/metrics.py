"""Prometheus metrics of one expert replica, in a registry of its own (so that several
replicas can live in one test process) served on its own HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cleave.common.metrics_http import MetricsHTTPServer

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ExpertMetrics(MetricsHTTPServer):
    """``cleave_expert_*``. Labels are bounded by the model: a layer and an expert id
    only ever take values the replica holds."""

    def __init__(self, instance_id: str, num_held: int) -> None:
        super().__init__(CollectorRegistry(), "expert-metrics")
        r = self.registry
        self.tokens = Counter(
            "cleave_expert_tokens", "Token slots run, by layer and expert", ["layer", "expert"], registry=r
        )
        self.request_seconds = Histogram(
            "cleave_expert_request_seconds", "Duration of RunExperts calls", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.layer_seconds = Histogram(
            "cleave_expert_layer_seconds", "Duration of RunExperts calls, by MoE layer", ["layer"],
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.rejected = Counter(
            "cleave_expert_rejected_requests", "Calls refused, by gRPC status code", ["code"], registry=r
        )
        Gauge("cleave_expert_held_experts", "(layer, expert) pairs held", registry=r).set(num_held)
        info = Gauge("cleave_expert_info", "Constant 1, labelled with the replica's identity", ["instance_id"], registry=r)
        info.labels(instance_id=instance_id).set(1)
