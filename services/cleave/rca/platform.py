"""Metrics of the live platform, read from Prometheus, as the analysis core's input.

:func:`collect` turns a time range of the platform's Prometheus into a
:class:`PlatformData`: a :class:`~cleave.rca.timeseries.MetricTable` with one column per
``<component>_<metric>`` series, the call graph between components, and the PromQL that
produced every series (the evidence a report quotes). Components are the instance ids
Prometheus' service discovery puts on every target (``instance_id`` and ``role`` labels:
``router-0``, ``prefill-0``, ``decode-1``, ``kvstore-0``, ``expert-0``, ...) plus ``redis``,
which has no exporter and is seen through its clients' command latency.

The Prometheus HTTP API client (:class:`PrometheusAPI`, :class:`PrometheusUnavailable`)
lives in :mod:`cleave.observability.prometheus_api` and is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from string import Template

import numpy as np

from cleave.observability.prometheus_api import PrometheusAPI, PrometheusUnavailable
from cleave.rca.timeseries import MetricTable

__all__ = ["PrometheusAPI", "PrometheusUnavailable", "PlatformData", "SeriesQuery", "collect",
           "call_graph", "SERIES", "UP", "REDIS"]

JOB = 'job="cleave"'
REDIS = "redis"

# Who calls whom, by role: the router sends each request to a prefill and a decode
# worker; both move KV blocks through the stores and run MoE layers on expert replicas;
# every service reads or writes Redis (registry heartbeats, the KV index).
ROLE_CALLS = {"router": ("prefill", "decode"), "prefill": ("kvstore", "expert"), "decode": ("kvstore", "expert")}


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    """One metric of the table: ``metric`` is the name after ``<component>_``; ``expr`` a
    PromQL template aggregated ``by (instance_id)`` where ``$sel`` is the label matchers
    (``job="cleave"`` to collect every instance, plus ``instance_id="..."`` for one
    series' evidence; ``<by>="..."`` where ``by`` is not ``instance_id``), ``$w`` the rate window and ``$f`` the freshness window (samples
    older than it are not current). ``roles``: where the metric exists."""

    metric: str
    expr: str
    roles: tuple[str, ...]
    by: str = "instance_id"  # the label naming the component: a callee's series are its callers'


def _mean(metric: str) -> str:
    """Mean of a histogram over the window: rate of its sum over rate of its count."""
    return (f"sum by (instance_id) (rate({metric}_sum{{$sel}}[$w])) / "
            f"sum by (instance_id) (rate({metric}_count{{$sel}}[$w]))")


def _p90(metric: str) -> str:
    return f"histogram_quantile(0.9, sum by (instance_id, le) (rate({metric}_bucket{{$sel}}[$w])))"


def _rate(metric: str, matchers: str = "") -> str:
    return f"sum by (instance_id) (rate({metric}{{$sel{matchers}}}[$w]))"


def _gauge(metric: str) -> str:
    # Over the freshness window only: a plain selector would repeat a dead target's last
    # value for Prometheus' five-minute lookback.
    return f"sum by (instance_id) (last_over_time({metric}{{$sel}}[$f]))"


def _as_callers_see_it(per_caller: str, callee: str, alike: tuple[str, ...]) -> str:
    """A callee's latency as its callers measure it, from ``per_caller`` (one series per
    callee, caller ``instance_id`` and ``alike`` labels): among callers alike the least
    one's figure, then the slowest group. A slow callee is slow for every caller alike,
    while an overloaded caller (its CPU, its event loop) inflates only what it measures
    itself. Alike, for a KV store, is one operation from one role: a request's store calls
    follow one another (the prefill worker reads, then puts, then a decode worker reads),
    and a store stopped and continued in a cycle is paid for by the first of them, the
    later ones landing in the same running slice; the least over all callers of an
    operation was a decode worker's read, and hid the store. Expert replicas are called in
    each worker's own forward passes, not one call after another: the least caller's."""
    return f"max by ({callee}) (min by ({', '.join((callee, *alike))}) ({per_caller}))"


def _callers_mean(metric: str, callee: str, alike: tuple[str, ...] = ()) -> str:
    by = f"sum by ({', '.join((callee, *alike, 'instance_id'))})"
    return _as_callers_see_it(
        f"{by} (rate({metric}_sum{{$sel}}[$w])) / ({by} (rate({metric}_count{{$sel}}[$w])) > 0)", callee, alike)


def _callers_p90(metric: str, callee: str, alike: tuple[str, ...] = ()) -> str:
    by = ", ".join((callee, *alike, "instance_id", "le"))
    return _as_callers_see_it(
        f"histogram_quantile(0.9, sum by ({by}) (rate({metric}_bucket{{$sel}}[$w])))", callee, alike)


# The KV store's callers alike: one operation, one role (the ``role`` label service
# discovery puts on every target).
STORE_CALLERS_ALIKE = ("op", "role")


_GENERATE = ',endpoint=~"completions|chat_completions|grpc_generate"'
WORKERS = ("prefill", "decode")
ALL = ("router", "prefill", "decode", "kvstore", "expert")

# Read with the targets' roles, before the other series: see collect().
UP = SeriesQuery("up", "min by (instance_id) (min_over_time(up{$sel}[$f]))", ALL)

SERIES: tuple[SeriesQuery, ...] = (
    # A throttled or stopped process answers its scrape late: the one latency every target has.
    SeriesQuery("scrape_duration_seconds", "max by (instance_id) (max_over_time(scrape_duration_seconds{$sel}[$f]))", ALL),
    SeriesQuery("cpu_seconds_rate", _rate("process_cpu_seconds_total"), ALL),
    # router
    SeriesQuery("request_rate", _rate("cleave_router_requests_total", _GENERATE), ("router",)),
    SeriesQuery("error_rate", _rate("cleave_router_requests_total", _GENERATE + ',outcome="server_error"'), ("router",)),
    SeriesQuery("rejection_rate", _rate("cleave_router_rejections_total"), ("router",)),
    SeriesQuery("worker_failure_rate", _rate("cleave_router_worker_failures_total"), ("router",)),
    SeriesQuery("ttft_seconds", _mean("cleave_router_time_to_first_token_seconds"), ("router",)),
    SeriesQuery("ttft_p90_seconds", _p90("cleave_router_time_to_first_token_seconds"), ("router",)),
    SeriesQuery("tpot_seconds", _mean("cleave_router_inter_token_latency_seconds"), ("router",)),
    SeriesQuery("e2e_latency_seconds", _mean("cleave_router_e2e_request_latency_seconds"), ("router",)),
    # A wait, so a latency: the router's admission and tokenizing, not a resource of its own.
    SeriesQuery("queue_wait_latency_seconds", _mean("cleave_router_queue_wait_seconds"), ("router",)),
    SeriesQuery("running_requests", _gauge("cleave_router_requests_running"), ("router",)),
    SeriesQuery("generation_tokens_rate", _rate("cleave_router_generation_tokens_total"), ("router",)),
    # prefill and decode workers
    *(SeriesQuery(metric, Template(expr).safe_substitute(role=role), (role,)) for role in WORKERS for metric, expr in (
        ("request_rate", _rate("cleave_${role}_requests_total")),
        ("error_rate", _rate("cleave_${role}_requests_total", ',outcome="error"')),
        ("request_latency_seconds", _mean("cleave_${role}_request_seconds")),
        ("request_latency_p90_seconds", _p90("cleave_${role}_request_seconds")),
        ("running_requests", _gauge("cleave_${role}_running_requests")),
        ("waiting_queue_requests", _gauge("cleave_${role}_waiting_requests")),
        ("free_kv_blocks", _gauge("cleave_${role}_free_kv_blocks")),
        ("kv_error_rate", _rate("cleave_${role}_kv_errors_total")),
        ("kv_blocks_rate", _rate("cleave_${role}_kv_blocks_total")),
        ("generated_tokens_rate", _rate("cleave_${role}_generated_tokens_total")),
        ("preemption_rate", _rate("cleave_${role}_preemptions_total")),
    )),
    # KV store
    SeriesQuery("transfer_rate", _rate("cleave_kvstore_transfer_seconds_count"), ("kvstore",)),
    SeriesQuery("transfer_latency_seconds", _mean("cleave_kvstore_transfer_seconds"), ("kvstore",)),
    SeriesQuery("transfer_latency_p90_seconds", _p90("cleave_kvstore_transfer_seconds"), ("kvstore",)),
    SeriesQuery("hit_rate", _rate("cleave_kvstore_hits_total"), ("kvstore",)),
    SeriesQuery("miss_rate", _rate("cleave_kvstore_misses_total"), ("kvstore",)),
    SeriesQuery("rejected_error_rate", _rate("cleave_kvstore_rejected_requests_total"), ("kvstore",)),
    SeriesQuery("index_error_rate", _rate("cleave_kvstore_index_errors_total"), ("kvstore",)),
    SeriesQuery("stored_bytes", _gauge("cleave_kvstore_stored_bytes"), ("kvstore",)),
    # ... and as its callers see it (prefill and decode workers, grouped by their `store` label).
    SeriesQuery("client_latency_seconds", _callers_mean("cleave_kvstore_client_call_seconds", "store", STORE_CALLERS_ALIKE),
                ("kvstore",), "store"),
    SeriesQuery("client_latency_p90_seconds", _callers_p90("cleave_kvstore_client_call_seconds", "store", STORE_CALLERS_ALIKE),
                ("kvstore",), "store"),
    # expert replicas
    SeriesQuery("request_rate", _rate("cleave_expert_request_seconds_count"), ("expert",)),
    SeriesQuery("request_latency_seconds", _mean("cleave_expert_request_seconds"), ("expert",)),
    SeriesQuery("request_latency_p90_seconds", _p90("cleave_expert_request_seconds"), ("expert",)),
    SeriesQuery("token_rate", _rate("cleave_expert_tokens_total"), ("expert",)),
    SeriesQuery("rejected_error_rate", _rate("cleave_expert_rejected_requests_total"), ("expert",)),
    # ... and as its callers see it: a stalled replica's queue shows only here.
    SeriesQuery("client_latency_seconds", _callers_mean("cleave_expert_client_call_seconds", "replica"),
                ("expert",), "replica"),
    SeriesQuery("client_latency_p90_seconds", _callers_p90("cleave_expert_client_call_seconds", "replica"),
                ("expert",), "replica"),
)

# Redis, as every service's client sees it: the median of the clients' own figures. Not
# their least, as for the other callees: most clients only heartbeat, a few commands a
# window, and one that happens to land between Redis' stalls would hide them; not their sum,
# which the busiest clients lead, and an overload slows exactly those.
REDIS_SERIES: tuple[tuple[str, str], ...] = (
    ("command_latency_seconds", "quantile(0.5, sum by (instance_id) (rate(cleave_redis_command_seconds_sum{$sel}[$w])) / "
                                "(sum by (instance_id) (rate(cleave_redis_command_seconds_count{$sel}[$w])) > 0))"),
    ("command_latency_p90_seconds", "quantile(0.5, histogram_quantile(0.9, sum by (instance_id, le) "
                                    "(rate(cleave_redis_command_seconds_bucket{$sel}[$w]))) >= 0)"),
    ("command_rate", "sum(rate(cleave_redis_command_seconds_count{$sel}[$w]))"),
    ("command_error_rate", "sum(rate(cleave_redis_command_errors_total{$sel}[$w]))"),
)


@dataclass(slots=True)
class PlatformData:
    """What :func:`collect` read.

    ``table``: one column per ``<component>_<metric>`` series on a regular time axis
    (``start`` to ``end`` every ``step``), NaN where Prometheus had no sample; ``up`` is 0
    for a component at the times after its first scrape when its target was gone (a
    killed instance drops out of service discovery). ``graph``: caller -> callees, every component in it. ``promql``:
    series name -> the PromQL that yields that series alone (evidence). ``roles``:
    component -> its role (``redis`` for Redis)."""

    table: MetricTable
    graph: dict[str, set[str]]
    promql: dict[str, str]
    roles: dict[str, str] = field(default_factory=dict)


def call_graph(roles: dict[str, str]) -> dict[str, set[str]]:
    """Caller -> callees from each component's role (:data:`ROLE_CALLS`); everyone calls Redis."""
    graph: dict[str, set[str]] = {component: set() for component in roles}
    graph.setdefault(REDIS, set())
    for caller, role in roles.items():
        if caller == REDIS:
            continue
        callees = {c for c, r in roles.items() if r in ROLE_CALLS.get(role, ())}
        graph[caller] = callees | {REDIS}
    return graph


def _instance_selector(component: str, by: str = "instance_id") -> str:
    return f'{JOB},{by}="{component}"'


def default_rate_window(step: float) -> str:
    """Four steps, at least 10 s: a rate needs two scrapes inside its window."""
    return f"{max(10, int(math.ceil(4 * step)))}s"


def freshness_window(step: float) -> str:
    """Two steps, at least 5 s (two scrapes of `cleave up`'s Prometheus)."""
    return f"{max(5, int(math.ceil(2 * step)))}s"


def collect(prom_url: str, start: float, end: float, step: float, *,
            rate_window: str | None = None, timeout: float = 10.0) -> PlatformData:
    """Read the platform's series from the Prometheus at ``prom_url`` between ``start``
    and ``end`` (epoch seconds) every ``step`` seconds. Rates and histogram means are
    over ``rate_window`` (default :func:`default_rate_window`). Raises
    :class:`PrometheusUnavailable` when Prometheus cannot answer, and ``ValueError`` when
    it knows no Cleave target in the range."""
    if not end > start or step <= 0:
        raise ValueError(f"need start < end and step > 0, got {start}, {end}, {step}")
    api = PrometheusAPI(prom_url, timeout=timeout)
    window, fresh = rate_window or default_rate_window(step), freshness_window(step)
    times = start + step * np.arange(int(math.floor((end - start) / step)) + 1)
    columns: dict[str, np.ndarray] = {}
    promql: dict[str, str] = {}

    def put(name: str, samples: list, template: Template, sel: str) -> None:
        column = columns.setdefault(name, np.full(len(times), np.nan))
        for t, value in samples:
            i = int(round((float(t) - start) / step))
            if 0 <= i < len(times):
                column[i] = float(value)
        promql[name] = template.substitute(sel=sel, w=window, f=fresh)

    roles: dict[str, str] = {}
    up = Template(UP.expr)
    roles_expr = f"min by (instance_id, role) (min_over_time(up{{{JOB}}}[{fresh}]))"
    for series in api.query_range(roles_expr, start, end, step):
        labels = series["metric"]
        if labels.get("instance_id") and labels.get("role"):
            roles[labels["instance_id"]] = labels["role"]
            put(f"{labels['instance_id']}_up", series["values"], up, _instance_selector(labels["instance_id"]))
    if not roles:
        raise ValueError(f"Prometheus at {prom_url} has no Cleave target (up{{{JOB}}}) "
                         f"between {start:.0f} and {end:.0f}")
    for query in SERIES:
        template = Template(query.expr)
        for series in api.query_range(template.substitute(sel=JOB, w=window, f=fresh), start, end, step):
            component = series["metric"].get(query.by)
            if roles.get(component) in query.roles:
                put(f"{component}_{query.metric}", series["values"], template, _instance_selector(component, query.by))
    for component in roles:
        column = columns[f"{component}_up"]
        seen = np.flatnonzero(~np.isnan(column))
        if len(seen):  # before its first scrape a target may not have existed yet
            column[seen[0]:] = np.where(np.isnan(column[seen[0]:]), 0.0, column[seen[0]:])
    for metric, expr in REDIS_SERIES:
        template = Template(expr)
        for series in api.query_range(template.substitute(sel=JOB, w=window, f=fresh), start, end, step):
            put(f"{REDIS}_{metric}", series["values"], template, JOB)
    if any(name.startswith(REDIS + "_") for name in columns):
        roles[REDIS] = REDIS
    names = sorted(columns)
    values = np.column_stack([columns[n] for n in names]) if names else np.empty((len(times), 0))
    return PlatformData(MetricTable(times, names, values), call_graph(roles), {n: promql[n] for n in names}, roles)
