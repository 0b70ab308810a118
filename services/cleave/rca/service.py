"""``cleave agent``: the ops agent as a service.

- ``POST /alerts``: an Alertmanager webhook. Firing alerts not seen before (fingerprint and
  start) are diagnosed together over the window around their start; resolved and repeated
  alerts are acknowledged and skipped. 503 when no diagnosis can be made (Alertmanager
  retries), the alerts then stay unseen.
- ``POST /diagnoses``: one diagnosis now (body: optional ``start``, ``end``,
  ``window_seconds``, ``anomaly_time``, ``use_llm``); the report JSON, or 503 with the reason.
- ``GET /diagnoses``: digests of the kept reports, newest first; ``GET /diagnoses/{id}``:
  one report, JSON or ``?format=markdown``.
- ``--interval-seconds``: a diagnosis of the last window every so often, kept only when its
  root cause scores at least ``--schedule-min-score``.

Every report is kept in memory (the last ``MAX_KEPT``), its digest pushed to the Redis list
``cleave:diagnoses`` and the whole report published on Kafka ``cleave.diagnoses.v1``; neither
can fail a diagnosis. Diagnoses run one at a time in a worker thread. ``/metrics``, JSON logs,
SIGTERM stops taking requests and lets the running diagnosis finish within the grace."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

from fastapi import Request
from pydantic import BaseModel, Field

from cleave.common import config as typed_config
from cleave.common import logging as cleave_logging
from cleave.common.registry import DEFAULT_REDIS_URL
from cleave.rca.agent import DIAGNOSES_TOPIC
from cleave.rca.diagnose import DEFAULT_PROMETHEUS_URL
from cleave.rca.llm import DEFAULT_LLM_URL, LlmConfig

ROLE = "agent"
DEFAULT_PORT = 8090
MAX_KEPT = 200


@dataclass(slots=True)
class AgentConfig:
    """The ops agent service."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "HTTP port (webhook, REST, /metrics)"})
    prometheus_url: str = field(default=DEFAULT_PROMETHEUS_URL, metadata={"help": "the platform's Prometheus"})
    redis_url: str = field(default=DEFAULT_REDIS_URL, metadata={"help": "the platform's Redis: registry, scaling decisions, the cleave:diagnoses list; empty: none"})
    events_bootstrap: str = field(default="", metadata={"help": "Kafka bootstrap servers: request events read, diagnoses published; empty: none"})
    diagnoses_topic: str = field(default=DIAGNOSES_TOPIC, metadata={"help": "Kafka topic of the reports"})
    llm_url: str = field(default=DEFAULT_LLM_URL, metadata={"help": "OpenAI-compatible base URL of the LLM; empty: statistics only"})
    llm_model: str = field(default="", metadata={"help": "model name; default: the first the endpoint lists"})
    llm_api_key: str = field(default="", metadata={"help": "bearer token of the LLM endpoint"})
    llm_timeout_seconds: float = field(default=60.0, metadata={"help": "deadline of one LLM call"})
    window_seconds: float = field(default=600.0, metadata={"help": "metrics window of a diagnosis"})
    step_seconds: float = field(default=2.0, metadata={"help": "seconds between rows"})
    interval_seconds: float = field(default=0.0, metadata={"help": "diagnose the last window this often; 0: only on demand and on alerts"})
    schedule_min_score: float = field(default=10.0, metadata={"help": "a scheduled diagnosis is kept only when its root cause scores this much"})
    dedup_seconds: float = field(default=86400.0, metadata={"help": "how long a diagnosed alert (fingerprint, start) is remembered"})
    timeout_graceful_shutdown: int = field(default=30, metadata={"help": "seconds a running diagnosis gets after SIGTERM"})

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], not {self.port}")
        for name in ("llm_timeout_seconds", "window_seconds", "step_seconds", "dedup_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        if self.interval_seconds < 0:
            raise ValueError("interval_seconds must be >= 0 (0: no schedule)")
        if not self.prometheus_url:
            raise ValueError("prometheus_url is required")

    def llm(self) -> LlmConfig | None:
        if not self.llm_url:
            return None
        return LlmConfig(self.llm_url, self.llm_model, self.llm_api_key, self.llm_timeout_seconds)


class DiagnosisRequest(BaseModel):
    """``POST /diagnoses``: the window (default: the last ``window_seconds``), the anomaly
    time (default: detected) and whether to ask the LLM."""

    start: float | None = None
    end: float | None = None
    window_seconds: float | None = Field(default=None, gt=0)
    anomaly_time: float | None = None
    use_llm: bool = True


def parse_time(value: Any) -> float | None:
    """Epoch seconds of an Alertmanager RFC 3339 time (``2026-11-30T08:12:04.123Z``)."""
    from datetime import datetime

    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def alert_key(alert: dict[str, Any]) -> str:
    labels = alert.get("labels") or {}
    identity = alert.get("fingerprint") or ",".join(f"{k}={labels[k]}" for k in sorted(labels))
    return f"{identity}@{alert.get('startsAt', '')}"


def build_app(config: AgentConfig):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    from cleave.events.publisher import EventPublisher
    from cleave.observability import status_lists
    from cleave.rca.agent import DiagnosisError, diagnose, digest
    from cleave.rca.report import to_markdown
    from cleave.router.errors import APIError, install_handlers

    log = cleave_logging.setup(ROLE)
    registry = CollectorRegistry()
    diagnoses = Counter("cleave_agent_diagnoses", "Diagnoses by trigger and outcome (ok, statistics_only, failed)",
                        ["trigger", "outcome"], registry=registry)
    seconds = Histogram("cleave_agent_diagnosis_seconds", "Duration of one diagnosis", registry=registry,
                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
    alerts = Counter("cleave_agent_alerts", "Alerts received by the webhook, by what was done (diagnosed, duplicate, resolved)",
                     ["result"], registry=registry)
    publisher = (EventPublisher(config.events_bootstrap, config.diagnoses_topic, buffer_size=100, registry=registry)
                 if config.events_bootstrap else None)
    kept: OrderedDict[str, dict[str, Any]] = OrderedDict()
    seen: dict[str, float] = {}
    one_at_a_time = asyncio.Lock()
    base_url = f"http://{'127.0.0.1' if config.host in ('0.0.0.0', '::', '') else config.host}:{config.port}"

    async def run_diagnosis(trigger: dict[str, Any], start: float, end: float, anomaly_time: float | None = None,
                            use_llm: bool = True) -> dict[str, Any]:
        began = time.monotonic()
        async with one_at_a_time:
            try:
                report = await asyncio.to_thread(
                    diagnose, config.prometheus_url, start, end, config.step_seconds, anomaly_time=anomaly_time,
                    llm=config.llm() if use_llm else None, redis_url=config.redis_url,
                    events_bootstrap=config.events_bootstrap, trigger=trigger)
            except DiagnosisError as exc:
                diagnoses.labels(trigger["kind"], "failed").inc()
                log.warning("no diagnosis", extra={"trigger": trigger["kind"], "error": str(exc)})
                raise APIError(503, f"no diagnosis: {exc}", code="prometheus_unavailable") from None
            finally:
                seconds.observe(time.monotonic() - began)
        diagnoses.labels(trigger["kind"], "statistics_only" if report["statistics_only"] else "ok").inc()
        log.info("diagnosis", extra={"id": report["id"], "summary": report["summary"], "trigger": trigger["kind"],
                                     "llm": report["llm"]["reason"] or "accepted",
                                     "seconds": round(time.monotonic() - began, 2)})
        return report

    async def keep(report: dict[str, Any]) -> None:
        kept[report["id"]] = report
        while len(kept) > MAX_KEPT:
            kept.popitem(last=False)
        if config.redis_url:
            error = await asyncio.to_thread(status_lists.push, config.redis_url, status_lists.DIAGNOSES_KEY,
                                            digest(report, f"{base_url}/diagnoses/{report['id']}"))
            if error:
                log.warning("diagnosis not pushed to Redis", extra={"id": report["id"], "error": error})
        if publisher is not None:
            publisher.publish(report)

    async def schedule() -> None:
        while True:
            await asyncio.sleep(config.interval_seconds)
            end = time.time()
            try:
                report = await run_diagnosis({"kind": "schedule"}, end - config.window_seconds, end)
            except APIError:
                continue
            except Exception:  # the schedule must outlive one bad run
                log.exception("scheduled diagnosis failed")
                continue
            cause = report["root_cause"]
            if cause and cause["score"] >= config.schedule_min_score:
                await keep(report)

    @asynccontextmanager
    async def lifespan(app_):
        task = asyncio.create_task(schedule(), name="agent-schedule") if config.interval_seconds else None
        log.info("ops agent", extra={"url": base_url, "prometheus_url": config.prometheus_url,
                                     "llm_url": config.llm_url or "off", "interval_seconds": config.interval_seconds})
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            if publisher is not None:
                await asyncio.to_thread(publisher.close)

    app = FastAPI(title="cleave agent", lifespan=lifespan)
    install_handlers(app, lambda request, status: None)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/diagnoses")
    async def create(body: DiagnosisRequest | None = None):
        body = body or DiagnosisRequest()
        end = body.end if body.end is not None else time.time()
        start = body.start if body.start is not None else end - (body.window_seconds or config.window_seconds)
        if not start < end:
            raise APIError(400, f"start ({start}) must be before end ({end})", param="start", code="invalid_value")
        report = await run_diagnosis({"kind": "api"}, start, end, body.anomaly_time, body.use_llm)
        await keep(report)
        return report

    @app.get("/diagnoses")
    async def list_diagnoses():
        return {"diagnoses": [digest(r, f"{base_url}/diagnoses/{r['id']}") for r in reversed(kept.values())]}

    @app.get("/diagnoses/{report_id}")
    async def show(report_id: str, format: str = "json"):
        report = kept.get(report_id)
        if report is None:
            raise APIError(404, f"no diagnosis {report_id!r} (the last {MAX_KEPT} are kept)", code="not_found")
        if format == "markdown":
            return PlainTextResponse(to_markdown(report), media_type="text/markdown")
        if format != "json":
            raise APIError(400, "format must be json or markdown", param="format", code="invalid_value")
        return report

    @app.post("/alerts")
    async def webhook(request: Request):
        try:
            payload = await request.json()
        except ValueError:
            raise APIError(400, "the body is not JSON", code="invalid_json") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
            raise APIError(400, "not an Alertmanager webhook payload: no 'alerts' list", param="alerts",
                           code="invalid_value")
        now = time.time()
        for key in [k for k, t in seen.items() if now - t > config.dedup_seconds]:
            del seen[key]
        firing, skipped = [], {"duplicate": 0, "resolved": 0}
        for alert in payload["alerts"]:
            if not isinstance(alert, dict) or alert.get("status", "firing") != "firing":
                skipped["resolved"] += 1
            elif alert_key(alert) in seen or alert_key(alert) in {alert_key(a) for a in firing}:
                skipped["duplicate"] += 1
            else:
                firing.append(alert)
        for result, count in skipped.items():
            alerts.labels(result).inc(count)
        if not firing:
            return JSONResponse({"diagnoses": [], "skipped": skipped})
        starts = [t for a in firing if (t := parse_time(a.get("startsAt"))) is not None] or [now]
        end = min(now, min(starts) + config.window_seconds / 4)
        names = sorted({(a.get("labels") or {}).get("alertname", "?") for a in firing})
        trigger = {"kind": "alert", "alerts": names, "detail": payload.get("groupKey", ""),
                   "fingerprints": [alert_key(a) for a in firing]}
        # Seen from now on: Alertmanager re-sends when a slow diagnosis outlasts its
        # timeout, and that retry must not start a second one.
        for key in trigger["fingerprints"]:
            seen[key] = now
        try:
            report = await run_diagnosis(trigger, end - config.window_seconds, end)
        except APIError:
            for key in trigger["fingerprints"]:
                seen.pop(key, None)
            raise
        alerts.labels("diagnosed").inc(len(firing))
        await keep(report)
        return JSONResponse({"diagnoses": [{"id": report["id"], "summary": report["summary"]}], "skipped": skipped})

    app.state.kept = kept
    return app


def agent_tiers(args: argparse.Namespace) -> list[list]:
    """``cleave up``: the agent in a tier of its own after Prometheus (none with
    ``--no-agent`` or ``--no-prometheus``), on loopback, the platform's router as its LLM."""
    from cleave.launcher import ProcessSpec, cleave_argv, client_host

    if args.no_agent or args.no_prometheus:
        return []
    host = client_host(args.host)
    url = f"http://127.0.0.1:{args.agent_port}"
    single = args.mode == "single"
    argv = cleave_argv(
        ROLE, "--host", "127.0.0.1", "--port", str(args.agent_port),
        "--prometheus-url", f"http://127.0.0.1:{args.prometheus_port}",
        "--redis-url", "" if single else f"redis://{host}:{args.redis_port}/0",
        "--events-bootstrap", "" if single or args.no_events else f"{host}:{args.kafka_port}",
        "--llm-url", f"http://{host}:{args.port}/v1", "--llm-model", args.served_model_name or args.model,
    )
    return [[ProcessSpec(ROLE, argv, health_url=f"{url}/health",
                         info={"url": url, "diagnoses": f"{url}/diagnoses", "webhook": f"{url}/alerts"})]]


def serve(config: AgentConfig) -> int:
    import uvicorn

    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None, access_log=False,
                                           timeout_graceful_shutdown=config.timeout_graceful_shutdown))
    server.run()
    return 0 if server.started else 1


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave agent``."""
    parser = argparse.ArgumentParser(prog="cleave agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    typed_config.add_arguments(parser, AgentConfig)
    try:
        config = typed_config.from_namespace(AgentConfig, parser.parse_args(argv))
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    return serve(config)


if __name__ == "__main__":
    sys.exit(run_command(ROLE, sys.argv[1:]))
