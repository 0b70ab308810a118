"""``cleave diagnose``: one diagnosis of the running platform, with its progress on stderr
and the report on stdout (Markdown, or the report JSON with ``--json``).

Exit 0 with a report (statistics-only included), 1 when no diagnosis can be made
(Prometheus away, no data in the window), 2 on bad arguments."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence

from cleave.common.registry import DEFAULT_REDIS_URL
from cleave.rca.llm import DEFAULT_LLM_URL, LlmConfig

DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
DEFAULT_EVENTS_BOOTSTRAP = "127.0.0.1:9092"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds of ``600``, ``90s``, ``10m``, ``1h``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 600, 90s, 10m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--llm-url", default=os.environ.get("CLEAVE_LLM_URL", DEFAULT_LLM_URL),
                        help="OpenAI-compatible base URL of the LLM (default: the platform's router)")
    parser.add_argument("--llm-model", default=os.environ.get("CLEAVE_LLM_MODEL", ""),
                        help="model name (default: the first the endpoint lists)")
    parser.add_argument("--llm-api-key", default=os.environ.get("CLEAVE_LLM_API_KEY", ""),
                        help="bearer token, if the endpoint wants one (env CLEAVE_LLM_API_KEY)")
    parser.add_argument("--llm-timeout", type=float, default=60.0, help="seconds per LLM call")
    parser.add_argument("--no-llm", action="store_true", help="statistics only")


def llm_config(args: argparse.Namespace) -> LlmConfig | None:
    if args.no_llm or not args.llm_url:
        return None
    return LlmConfig(url=args.llm_url, model=args.llm_model, api_key=args.llm_api_key,
                     timeout_seconds=args.llm_timeout)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cleave diagnose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus-url", default=os.environ.get("CLEAVE_PROMETHEUS_URL", DEFAULT_PROMETHEUS_URL))
    p.add_argument("--window", "--since", dest="window", type=duration, default=600.0,
                   help="how far back from --end to read (600, 10m, 1h; default 10m)")
    p.add_argument("--end", type=float, default=None, help="end of the window, epoch seconds (default now)")
    p.add_argument("--step", type=float, default=2.0, help="seconds between rows (default 2, the scrape interval)")
    p.add_argument("--anomaly-time", type=float, default=None, help="epoch seconds; detected when left out")
    p.add_argument("--top", type=int, default=3, help="candidates the LLM investigates")
    add_llm_arguments(p)
    p.add_argument("--redis-url", default=os.environ.get("CLEAVE_REDIS_URL", DEFAULT_REDIS_URL),
                   help="the platform's Redis: registry and scaling decisions (empty: none)")
    p.add_argument("--events-bootstrap", default=os.environ.get("CLEAVE_EVENTS_BOOTSTRAP", DEFAULT_EVENTS_BOOTSTRAP),
                   help="Kafka of the request-lifecycle events (empty: none)")
    p.add_argument("--publish", action="store_true",
                   help="also push the report to Redis (cleave:diagnoses) and Kafka (cleave.diagnoses.v1)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the report JSON")
    fmt.add_argument("--markdown", action="store_true", help="print the report as Markdown (the default)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def publish(report: dict, redis_url: str, bootstrap: str) -> list[str]:
    """Push ``report`` to Redis and Kafka; what failed, as text."""
    from prometheus_client import CollectorRegistry

    from cleave.events.publisher import EventPublisher
    from cleave.observability import status_lists
    from cleave.rca.agent import DIAGNOSES_TOPIC, digest

    failed = []
    if redis_url and (error := status_lists.push(redis_url, status_lists.DIAGNOSES_KEY, digest(report))):
        failed.append(error)
    if bootstrap:
        registry = CollectorRegistry()
        publisher = EventPublisher(bootstrap, DIAGNOSES_TOPIC, buffer_size=10, registry=registry,
                                   delivery_timeout_seconds=5.0)
        publisher.publish(report)
        # close() gives up on what a producer still connecting has not taken: wait for the ack.
        deadline = time.monotonic() + 10.0
        while not registry.get_sample_value("cleave_events_sent_total") and time.monotonic() < deadline:
            time.sleep(0.05)
        publisher.close(timeout=5.0)
        if not registry.get_sample_value("cleave_events_sent_total"):
            failed.append(f"Kafka {bootstrap}: the report was not acknowledged")
    return failed


def run(args: argparse.Namespace) -> int:
    from cleave.rca.agent import DiagnosisError, diagnose
    from cleave.rca.report import to_markdown

    began = time.monotonic()

    def progress(line: str) -> None:
        if not args.quiet:
            print(f"[{time.monotonic() - began:5.1f}s] {line}", file=sys.stderr, flush=True)

    end = time.time() if args.end is None else args.end
    try:
        report = diagnose(args.prometheus_url, end - args.window, end, args.step, anomaly_time=args.anomaly_time,
                          llm=llm_config(args), redis_url=args.redis_url, events_bootstrap=args.events_bootstrap,
                          trigger={"kind": "cli"}, top_k=args.top, progress=progress)
    except DiagnosisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.publish:
        for failure in publish(report, args.redis_url, args.events_bootstrap):
            print(f"warning: not published to {failure}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else to_markdown(report))
    return 0


def run_command(command: str, argv: Sequence[str]) -> int:
    """Entry point of ``cleave diagnose``."""
    args = build_parser().parse_args(argv)
    if args.step <= 0 or args.top < 1:
        print("error: --step must be > 0 and --top >= 1", file=sys.stderr)
        return 2
    try:
        return run(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130
