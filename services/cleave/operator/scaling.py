"""The scaling controller: steps the prefill and decode pools (and so the P:D ratio)
against the spec's latency targets, from metrics read out of Prometheus.

``decide`` is pure: the targets, the policy, the budget, the replicas now, each pool's
bounds, the measured metrics, the time and the time of the last decision in; one
``Decision`` (or None) out. ``PrometheusClient`` runs the instant queries (docs/metrics.md)
and answers None when Prometheus cannot be read. ``push_decision`` writes a decision to the
Redis list the router's /dashboard reads (docs/observability.md)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping

from cleave.observability import status_lists
from cleave.observability.prometheus_api import PrometheusAPI, PrometheusUnavailable
from cleave.observability.status_lists import DECISIONS_KEY

log = logging.getLogger(__name__)

SCALED_ROLES = ("prefill", "decode")
IDLE_FRACTION = 0.5  # both quantiles under half their targets: a pool can give one back


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    percentile: float
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    enabled: bool = False
    scale_up_step: int = 1
    scale_down_step: int = 1
    cooldown_seconds: float = 300

    @classmethod
    def from_spec(cls, autoscaling: Mapping[str, Any] | None) -> "Policy":
        raw = (autoscaling or {}).get("policy") or {}
        return cls(enabled=bool(raw.get("enabled", False)), scale_up_step=int(raw.get("scaleUpStep", 1)),
                   scale_down_step=int(raw.get("scaleDownStep", 1)),
                   cooldown_seconds=float(raw.get("cooldownSeconds", 300)))


def targets_from_spec(spec: Mapping[str, Any]) -> dict[str, Target]:
    return {name: Target(float(raw["percentile"]), float(raw["seconds"]))
            for name, raw in (spec.get("targets") or {}).items() if raw and name in ("ttft", "tpot")}


@dataclasses.dataclass(frozen=True, slots=True)
class Metrics:
    """Measured over the query window; None where Prometheus has no sample (no traffic)."""
    ttft: float | None = None  # seconds, at the TTFT target's percentile
    tpot: float | None = None  # seconds, at the TPOT target's percentile
    prefill_waiting: float | None = None  # requests waiting in the prefill workers' queues
    decode_running: float | None = None
    decode_waiting: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    role: str
    before: int
    after: int
    reason: str
    limited: bool = False  # a step was wanted but min/max or the budget forbids it (after == before)

    def record(self, time: str) -> dict[str, Any]:
        return {"time": time, "role": self.role, "from": self.before, "to": self.after, "reason": self.reason}


def _p(target: Target) -> str:
    return f"p{target.percentile:g}"


def decide(*, targets: Mapping[str, Target], policy: Policy, replicas: Mapping[str, int],
           bounds: Mapping[str, tuple[int, int]], metrics: Metrics | None, now: float,
           last_decision: float | None, paused: bool = False, max_total: int | None = None) -> Decision | None:
    """One step for one pool, or None. TTFT over target while prefill requests wait: add
    prefill. TPOT over target while decode requests wait: add decode. Both quantiles under
    half their targets: the idler pool (the lower quantile/target) gives replicas back.
    Nothing while paused, disabled, within ``cooldown_seconds`` of the last decision, or
    without the metrics a rule needs; a wanted step that min/max or the budget forbids
    comes back ``limited``."""
    if paused or not policy.enabled or metrics is None:
        return None
    if last_decision is not None and now - last_decision < policy.cooldown_seconds:
        return None
    total = sum(replicas.values())
    ttft, tpot = targets.get("ttft"), targets.get("tpot")

    def up(role: str, why: str) -> Decision:
        before = replicas[role]
        after = min(before + policy.scale_up_step, bounds[role][1])
        if max_total is not None:
            after = min(after, before + max(0, max_total - total))
        if after <= before:
            limit = (f"at maxReplicas {bounds[role][1]}" if before >= bounds[role][1]
                     else f"the budget of {max_total} replicas is used ({total})")
            return Decision(role, before, before, f"{why}; {role} stays at {before}: {limit}", limited=True)
        return Decision(role, before, after, why)

    if ttft and metrics.ttft is not None and metrics.ttft > ttft.seconds and (metrics.prefill_waiting or 0) > 0:
        return up("prefill", f"TTFT {_p(ttft)} {metrics.ttft:.3g} s over {ttft.seconds:g} s "
                             f"with {metrics.prefill_waiting:g} prefill requests waiting")
    if tpot and metrics.tpot is not None and metrics.tpot > tpot.seconds and (metrics.decode_waiting or 0) > 0:
        return up("decode", f"TPOT {_p(tpot)} {metrics.tpot:.3g} s over {tpot.seconds:g} s "
                            f"with {metrics.decode_waiting:g} decode requests waiting "
                            f"({metrics.decode_running or 0:g} running)")
    if not (ttft and tpot) or metrics.ttft is None or metrics.tpot is None:
        return None
    load = {"prefill": metrics.ttft / ttft.seconds, "decode": metrics.tpot / tpot.seconds}
    if max(load.values()) >= IDLE_FRACTION:
        return None
    why = (f"TTFT {_p(ttft)} {metrics.ttft:.3g} s and TPOT {_p(tpot)} {metrics.tpot:.3g} s "
           f"under {IDLE_FRACTION:.0%} of their targets ({ttft.seconds:g} s, {tpot.seconds:g} s)")
    for role in sorted(SCALED_ROLES, key=lambda r: load[r]):  # the idlest pool first
        before = replicas[role]
        after = max(before - policy.scale_down_step, bounds[role][0])
        if after < before:
            return Decision(role, before, after, f"{why}; {role} is the idlest pool")
    return None


# --- metrics: PromQL instant queries ----------------------------------------------------

class PrometheusClient:
    """Instant queries against ``url`` (``/api/v1/query``). ``metrics`` answers None when
    Prometheus cannot be reached or answers an error; ``error`` then says why."""

    def __init__(self, url: str, *, timeout: float = 5.0, window: str = "2m"):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.window = window
        self.error = ""

    def query(self, expr: str) -> float | None:
        """The query's value (summed over the vector's series); None for an empty vector
        or NaN. Raises PrometheusUnavailable when Prometheus cannot answer."""
        return PrometheusAPI(self.url, timeout=self.timeout).query_value(expr)

    def quantile(self, metric: str, percentile: float) -> str:
        return (f"histogram_quantile({percentile / 100:g}, "
                f"sum by (le) (rate({metric}_bucket[{self.window}])))")

    def metrics(self, targets: Mapping[str, Target]) -> Metrics | None:
        queries = {
            "prefill_waiting": "sum(cleave_prefill_waiting_requests)",
            "decode_running": "sum(cleave_decode_running_requests)",
            "decode_waiting": "sum(cleave_decode_waiting_requests)",
        }
        if "ttft" in targets:
            queries["ttft"] = self.quantile("cleave_router_time_to_first_token_seconds", targets["ttft"].percentile)
        if "tpot" in targets:
            queries["tpot"] = self.quantile("cleave_router_inter_token_latency_seconds", targets["tpot"].percentile)
        try:
            values = {name: self.query(expr) for name, expr in queries.items()}
        except PrometheusUnavailable as error:
            self.error = str(error)
            log.warning("%s", self.error)
            return None
        self.error = ""
        return Metrics(**values)


def push_decision(redis_url: str, entry: Mapping[str, Any]) -> bool:
    """LPUSH the decision to ``cleave:scaling:decisions`` and keep the newest 100; a Redis
    failure is logged and answered False, never raised."""
    if not redis_url:
        return False
    error = status_lists.push(redis_url, DECISIONS_KEY, entry, timeout=2)
    if error:
        log.warning("scaling decision not written to Redis %s: %s", DECISIONS_KEY, error)
    return error is None