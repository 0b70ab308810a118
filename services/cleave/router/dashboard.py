"""The router's live status page: ``GET /dashboard`` (one self-contained HTML page) and
``GET /dashboard/data`` (the JSON it polls), for where no Grafana runs.

A sampler started with the app keeps, every ``interval`` seconds, one sample in a ring
buffer (the last ``history_seconds``): pool sizes by role, the prefill:decode ratio,
TTFT and TPOT quantiles, request and error rates and the KV hit rate over the last
``window_seconds`` (deltas of the router's own counters and histogram buckets), calls
and tokens per second per expert replica (deltas of their load reports) and each
worker's running and waiting sequences. Recent scaling decisions and diagnoses are read
from the Redis lists ``cleave:scaling:decisions`` and ``cleave:diagnoses``
(docs/observability.md)."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fastapi.responses import HTMLResponse

from cleave.common.tasks import cancel_and_wait
from cleave.observability.status_lists import DECISIONS_KEY, DIAGNOSES_KEY
from cleave.router.dashboard_page import PAGE
from cleave.router.workers import HEALTH_SERVING, ROLES

log = logging.getLogger("cleave.router")

NUM_RECENT = 10
GENERATION_ENDPOINTS = ("completions", "chat_completions", "grpc_generate")


def quantile_from_buckets(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a histogram given as cumulative ``(upper_bound, count)``
    buckets sorted by bound, the last one ``+Inf``, interpolated linearly inside the
    bucket it falls in, as Prometheus' ``histogram_quantile`` does: a quantile in the
    ``+Inf`` bucket is the largest finite bound. None for an empty histogram."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], not {q}")
    if not buckets or not math.isinf(buckets[-1][0]):
        raise ValueError("buckets must end with the +Inf bucket")
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    i = bisect.bisect_left([count for _, count in buckets], rank)
    if i == len(buckets) - 1:
        return buckets[-2][0] if len(buckets) > 1 else None
    upper, count = buckets[i]
    lower, before = (0.0, 0.0) if i == 0 else buckets[i - 1]
    if count == before:
        return lower
    return lower + (upper - lower) * (rank - before) / (count - before)


def histogram_buckets(histogram) -> list[tuple[float, float]]:
    """Cumulative ``(upper_bound, count)`` buckets of an unlabelled prometheus_client histogram."""
    return [
        (float(s.labels["le"]), s.value)
        for metric in histogram.collect() for s in metric.samples if s.name.endswith("_bucket")
    ]


def counter_total(counter, **match: Sequence[str]) -> float:
    """Sum of a prometheus_client counter's ``_total`` samples whose labels are in ``match``."""
    return sum(
        s.value for metric in counter.collect() for s in metric.samples
        if s.name.endswith("_total") and all(s.labels.get(k) in v for k, v in match.items())
    )


@dataclass
class Totals:
    """The cumulative figures one sample is derived from, at time ``t``."""

    t: float
    ttft: list[tuple[float, float]]
    tpot: list[tuple[float, float]]
    requests: float
    errors: float
    prompt_tokens: float
    cached_tokens: float
    experts: dict[str, tuple[float, float]] = field(default_factory=dict)


def read_totals(metrics, pool, t: float) -> Totals:
    experts = {
        r.instance_id: (float(r.load.get("num_calls", 0)), float(r.load.get("num_tokens", 0)))
        for r in pool.records.get("expert", [])
    }
    return Totals(
        t,
        histogram_buckets(metrics.ttft),
        histogram_buckets(metrics.itl),
        counter_total(metrics.requests, endpoint=GENERATION_ENDPOINTS),
        counter_total(metrics.requests, endpoint=GENERATION_ENDPOINTS, outcome=("server_error",)),
        counter_total(metrics.prompt_tokens),
        counter_total(metrics.cached_tokens),
        experts,
    )


def _delta_buckets(now: list[tuple[float, float]], before: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(le, count - old) for (le, count), (_, old) in zip(now, before)]


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def pool_sizes(pool) -> dict[str, dict[str, int]]:
    """Per role: instances registered for this router's model (``live``) and those whose
    last health check answered SERVING (``serving``)."""
    sizes = {}
    for role in ROLES:
        records = [r for r in pool.records.get(role, []) if role in ("kvstore", "router") or pool.serves_model(r)]
        serving = [r for r in records if role == "router" or pool.health.get(r.instance_id) == HEALTH_SERVING]
        sizes[role] = {"live": len(records), "serving": len(serving)}
    return sizes


def derive_sample(now: Totals, before: Totals, pool) -> dict[str, Any]:
    """One sample: the pools as they are and the rates and quantiles from ``before`` to ``now``."""
    dt = max(now.t - before.t, 1e-9)
    ttft, tpot = _delta_buckets(now.ttft, before.ttft), _delta_buckets(now.tpot, before.tpot)
    prompt = now.prompt_tokens - before.prompt_tokens
    sizes = pool_sizes(pool)
    prefill, decode = sizes["prefill"]["serving"], sizes["decode"]["serving"]
    experts = {}
    for instance_id, (calls, tokens) in now.experts.items():
        old_calls, old_tokens = before.experts.get(instance_id, (calls, tokens))
        experts[instance_id] = {"calls_per_s": _rounded(max(calls - old_calls, 0) / dt, 3),
                                "tokens_per_s": _rounded(max(tokens - old_tokens, 0) / dt, 3)}
    workers = {
        r.instance_id: {"role": role, "num_running": r.load.get("num_running", 0),
                        "num_waiting": r.load.get("num_waiting", 0), "health": pool.health.get(r.instance_id, "UNKNOWN")}
        for role in ("prefill", "decode") for r in pool.records.get(role, []) if pool.serves_model(r)
    }
    return {
        "t": round(now.t, 3),
        "pools": sizes,
        "pd_ratio": round(prefill / decode, 3) if decode else None,
        "ttft_p50": _rounded(quantile_from_buckets(0.5, ttft)),
        "ttft_p90": _rounded(quantile_from_buckets(0.9, ttft)),
        "tpot_p50": _rounded(quantile_from_buckets(0.5, tpot)),
        "tpot_p90": _rounded(quantile_from_buckets(0.9, tpot)),
        "request_rate": _rounded((now.requests - before.requests) / dt),
        "error_rate": _rounded((now.errors - before.errors) / dt),
        "kv_hit_rate": _rounded((now.cached_tokens - before.cached_tokens) / prompt) if prompt > 0 else None,
        "experts": experts,
        "workers": workers,
        "totals": {"requests": now.requests, "errors": now.errors, "prompt_tokens": now.prompt_tokens,
                   "cached_tokens": now.cached_tokens},
    }


class DashboardSampler:
    """Samples ``pool`` and ``metrics`` into a ring buffer of ``history_seconds``; rates and
    quantiles of a sample span the last ``window_seconds``."""

    def __init__(self, pool, metrics, *, interval: float = 2.0, window_seconds: float = 30.0,
                 history_seconds: float = 1800.0, clock: Callable[[], float] = time.time) -> None:
        self.pool, self.metrics, self.interval, self.clock = pool, metrics, interval, clock
        self.window_seconds = window_seconds
        self.samples: deque[dict[str, Any]] = deque(maxlen=max(1, int(history_seconds / interval)))
        self._window: deque[Totals] = deque()

    def sample(self) -> dict[str, Any]:
        now = read_totals(self.metrics, self.pool, self.clock())
        while len(self._window) > 1 and now.t - self._window[1].t >= self.window_seconds:
            self._window.popleft()
        before = self._window[0] if self._window else now
        self._window.append(now)
        sample = derive_sample(now, before, self.pool)
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception as exc:  # a bad sample must not end the page
                log.warning("dashboard sample failed", extra={"error": str(exc)})
            await asyncio.sleep(self.interval)

    def since(self, t: float) -> list[dict[str, Any]]:
        return [s for s in self.samples if s["t"] > t]


def _entry(raw) -> dict[str, Any]:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"value": value}


async def recent_entries(redis_client, key: str, count: int = NUM_RECENT) -> list[dict[str, Any]]:
    """The newest ``count`` JSON entries of a Redis list written with LPUSH (newest first)."""
    return [_entry(raw) for raw in await redis_client.lrange(key, 0, count - 1)]


def add_dashboard_routes(app, pool, metrics, config) -> DashboardSampler:
    """``GET /dashboard`` and ``GET /dashboard/data`` on ``app``; the sampler runs inside
    the app's lifespan, after the services it wraps are up and before they stop."""
    sampler = DashboardSampler(pool, metrics)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_):
        async with inner(app_) as state:
            task = asyncio.create_task(sampler.run(), name="dashboard-sampler")
            try:
                yield state
            finally:
                await cancel_and_wait(task)  # it reads Redis: one cancel may not take

    app.router.lifespan_context = lifespan

    @app.get("/dashboard")
    async def dashboard_page():
        return HTMLResponse(PAGE)

    @app.get("/dashboard/data")
    async def dashboard_data(since: float = 0.0):
        recent: dict[str, Any] = {}
        for name, key in (("decisions", DECISIONS_KEY), ("diagnoses", DIAGNOSES_KEY)):
            try:
                recent[name] = await recent_entries(pool.redis, key)
            except Exception as exc:  # Redis away: the page still shows the rest
                recent[name], recent[f"{name}_error"] = [], str(exc)
        return {
            "router": getattr(config, "instance_id", ""),
            "model": getattr(config, "served_model_name", ""),
            "now": time.time(),
            "interval_seconds": sampler.interval,
            "window_seconds": sampler.window_seconds,
            "targets": {"ttft_seconds": config.ttft_target_seconds, "tpot_seconds": config.tpot_target_seconds},
            "samples": sampler.since(since),
            "current": sampler.samples[-1] if sampler.samples else None,
            **recent,
        }

    return sampler
