"""The metrics catalogue: every registered metric documented in docs/metrics.md, and the
router's and engine's additions counted as documented."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from catalogue import ROOT, families
from cleave.common.engine_metrics import EngineStatsCollector
from cleave.router.errors import APIError
from cleave.router.metrics import RouterMetrics
from cleave.router.plugins.base import Pipeline

DOC = (ROOT / "docs" / "metrics.md").read_text()
_SUFFIX = {"counter": "_total"}


def documented_names() -> list[str]:
    names = []
    for service, found in families().items():
        for family in found:
            name = family.name + _SUFFIX.get(family.type, "")
            if service in ("prefill", "decode"):
                name = name.replace(f"cleave_{service}_", "cleave_<role>_")
            names.append(name)
    return sorted(set(names))


@pytest.mark.parametrize("name", documented_names())
def test_metric_is_documented(name: str) -> None:
    assert f"| `{name}` |" in DOC, f"{name} is missing from docs/metrics.md"


def value(metrics: RouterMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize(
    "status, code, reason",
    [
        (429, "slo", "slo"),
        (429, "rate_limited", "overloaded"),
        (429, None, "overloaded"),
        (503, "service_unavailable", "no_worker"),
        (503, "engine_unavailable", "engine_unavailable"),
        (503, "draining", "unavailable"),
    ],
)
def test_rejection_reasons(status: int, code: str | None, reason: str) -> None:
    metrics = RouterMetrics()
    error = APIError(status, "refused", code=code)
    assert metrics.count_rejection(error) is error
    assert value(metrics, "cleave_router_rejections_total", reason=reason) == 1
    assert sum(value(metrics, "cleave_router_rejections_total", reason=r) for r in
               ("slo", "overloaded", "no_worker", "engine_unavailable", "unavailable")) == 1


@pytest.mark.parametrize("status", [400, 404, 500])
def test_other_errors_are_no_rejections(status: int) -> None:
    metrics = RouterMetrics()
    metrics.count_rejection(APIError(status, "no"))
    assert value(metrics, "cleave_router_rejections_total", reason="overloaded") == 0
    assert value(metrics, "cleave_router_rejections_total", reason="unavailable") == 0


class _Chosen:
    instance_id = "decode-0"

    def __init__(self, score: float) -> None:
        self.score = score


def _Pipeline(*weights: float) -> Pipeline:
    # Scorers that never score: only their weights matter to the normalization.
    return Pipeline([(object(), weight) for weight in weights], picker=None)


@pytest.mark.parametrize("score, weights, observed", [(1.5, (2.0, 1.0), 0.5), (3.0, (2.0, 1.0), 1.0), (0.0, (1.0,), 0.0)])
def test_routing_score_is_normalized_by_the_weights(score: float, weights: tuple[float, ...], observed: float) -> None:
    metrics = RouterMetrics()
    metrics.observe_route("decode", _Chosen(score), _Pipeline(*weights))
    assert value(metrics, "cleave_router_routed_total", role="decode", instance_id="decode-0") == 1
    assert value(metrics, "cleave_router_routing_score_count", role="decode") == 1
    assert value(metrics, "cleave_router_routing_score_sum", role="decode") == pytest.approx(observed)


def test_round_robin_routes_without_a_score() -> None:
    metrics = RouterMetrics()
    metrics.observe_route("prefill", _Chosen(0.0), _Pipeline())
    assert value(metrics, "cleave_router_routed_total", role="prefill", instance_id="decode-0") == 1
    assert value(metrics, "cleave_router_routing_score_count", role="prefill") == 0


def test_queue_wait_is_observed_on_dispatch() -> None:
    metrics = RouterMetrics()
    tracker = metrics.track()
    tracker.on_dispatch()
    assert value(metrics, "cleave_router_queue_wait_seconds_count") == 1


def test_engine_counters_follow_stats() -> None:
    stats = {"num_preemptions": 3, "num_steps": 10, "num_scheduled_seqs": 25}
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector("cleave_decode_", lambda: stats))
    assert registry.get_sample_value("cleave_decode_preemptions_total") == 3
    assert registry.get_sample_value("cleave_decode_batched_sequences_total") == 25
    assert registry.get_sample_value("cleave_decode_batched_tokens_total") == 0
    stats["num_steps"] = 11
    assert registry.get_sample_value("cleave_decode_engine_steps_total") == 11
    assert b"# TYPE cleave_decode_preemptions_total counter" in generate_latest(registry)
