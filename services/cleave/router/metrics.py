"""The router's Prometheus metrics. Each app owns its registry so that several
apps (tests, or a router beside an engine) never collide on metric names."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

ENDPOINTS = ("completions", "chat_completions", "models", "health", "metrics", "grpc_generate")
OUTCOMES = ("success", "client_error", "server_error", "cancelled")
# Why a request was refused before generating: a 429 names its own reason in its error
# code when it is one of these, else it is ``overloaded``.
REJECTION_REASONS = ("slo", "overloaded", "no_worker", "engine_unavailable", "unavailable")
ROLES = ("prefill", "decode")

# The SLO targets of the alert rules (TTFT 2 s, TPOT 0.2 s) must be bucket boundaries.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5, 10, 30, 60, 120)
_SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2.5, 5)


def endpoint_label(path: str) -> str:
    """Bounded endpoint label for a request path; unknown paths share one label."""
    return {
        "/v1/completions": "completions",
        "/v1/chat/completions": "chat_completions",
        "/v1/models": "models",
        "/health": "health",
        "/metrics": "metrics",
    }.get(path, "models" if path.startswith("/v1/models/") else "other")


def outcome_label(status_code: int) -> str:
    if status_code < 400:
        return "success"
    return "client_error" if status_code < 500 else "server_error"


class RouterMetrics:
    """Request counts, latencies and token counts for the OpenAI front end."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # ``*_created`` series double the output and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cleave_router_requests", "Requests answered, by endpoint and outcome", ["endpoint", "outcome"], registry=r
        )
        self.finished = Counter(
            "cleave_router_request_finish", "Generations finished, by finish reason", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            "cleave_router_time_to_first_token_seconds",
            "From request arrival to the first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "cleave_router_inter_token_latency_seconds",
            "Time between successive generated tokens of one request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "cleave_router_e2e_request_latency_seconds",
            "From request arrival to its last token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("cleave_router_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.cached_tokens = Counter(
            "cleave_router_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.generation_tokens = Counter("cleave_router_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("cleave_router_requests_running", "Requests being generated now", registry=r)
        # Disaggregated serving only: where requests went and what failed on the way.
        self.routed = Counter(
            "cleave_router_routed", "Requests sent to a worker, by role and instance", ["role", "instance_id"],
            registry=r,
        )
        self.worker_failures = Counter(
            "cleave_router_worker_failures", "Worker calls that failed and were retried elsewhere, by role",
            ["role"], registry=r,
        )
        self.resumed = Counter(
            "cleave_router_decode_resumes", "Requests resumed on another decode worker mid-stream", registry=r
        )
        self.local_prefills = Counter(
            "cleave_router_local_prefills", "Requests sent straight to a decode worker, which prefilled them itself "
            "(prompts of at most local_prefill_tokens)", registry=r,
        )
        self.queue_wait = Histogram(
            "cleave_router_queue_wait_seconds", "From arrival to dispatch to the engine (admission, tokenizing)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.rejections = Counter(
            "cleave_router_rejections", "Requests refused before generating, by reason", ["reason"], registry=r
        )
        self.routing_score = Histogram(
            "cleave_router_routing_score", "Weighted score in [0, 1] of the worker each routing decision chose",
            ["role"], buckets=_SCORE_BUCKETS, registry=r,
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for role in ROLES:
            self.worker_failures.labels(role)
        # Every series exists from the start, so rates over a quiet label are 0, not absent.
        for endpoint in ENDPOINTS + ("other",):
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def observe_route(self, role: str, chosen, pipeline) -> None:
        """Count one routing decision; its score too when the pipeline has scorers."""
        self.routed.labels(role, chosen.instance_id).inc()
        score = pipeline.normalized_score(chosen)
        if score is not None:
            self.routing_score.labels(role).observe(score)

    def count_rejection(self, error):
        """Count a refused request (429 or 503) by reason; returns ``error`` for ``raise``."""
        if error.status_code == 429:
            self.rejections.labels(error.code if error.code in REJECTION_REASONS else "overloaded").inc()
        elif error.status_code == 503:
            code = {"service_unavailable": "no_worker"}.get(error.code, error.code)
            self.rejections.labels(code if code in REJECTION_REASONS else "unavailable").inc()
        return error

    def track(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Latency bookkeeping for one generation, from arrival to its last token."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last_token: float | None = None

    def on_dispatch(self) -> None:
        self.metrics.queue_wait.observe(time.perf_counter() - self.arrival)

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.arrival)
            # Tokens that came with the first (a lagging reader gets what piled up merged)
            # reached the client with it: no gap, but each is still one inter-token
            # interval, so the count stays generated tokens minus one per request.
            gap, intervals = 0.0, num_tokens - 1
        else:
            # Several tokens in one step share the gap evenly.
            gap, intervals = (now - self.last_token) / num_tokens, num_tokens
        for _ in range(intervals):
            self.metrics.itl.observe(gap)
        self.last_token = now
        self.metrics.generation_tokens.inc(num_tokens)

    def on_finish(self, finish_reason: str | None) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.arrival)
        if finish_reason in ("stop", "length", "abort"):
            self.metrics.finished.labels(finish_reason).inc()
