"""Root-cause analysis end to end: one local platform (tiny Mixtral, remote experts, a real
Prometheus scraping every 2 s) under steady background traffic; for each fault kind,
`cleave fault inject` labels a fault, the test waits until Prometheus shows it, and
`cleave diagnose --json --no-llm` must name the injected component as the top-1 root cause,
with evidence series and the PromQL that shows them. Faults run one at a time; the platform
recovers (and a clean normal window is recorded) before the next; the kills come last."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Callable

import httpx
import pytest

from cleave.launcher import wait_until
from cleave.observability.prometheus_api import PrometheusAPI, PrometheusUnavailable
from local_platform import Platform

# --max-num-seqs 8: the decode pool's capacity, which decode-overload's 24 streams exceed.
# The agent is run by the test (cleave diagnose), not as cleave up's service.
UP_FLAGS = ["--num-kv-blocks", "256", "--max-model-len", "512", "--block-size", "16", "--max-num-seqs", "8",
                "--no-agent"]
STEP = 2.0
RATE_WINDOW = 10.0  # collect()'s rate window at a 2 s step: rates lag a change by this much
NORMAL_SECONDS = 12.0  # normal rows recorded before each fault
ANOMALY_SECONDS = 8.0  # anomalous rows recorded after the fault shows
FAULT_SECONDS = 90  # each fault ends by itself after this; the test clears it sooner
KINDS = ["kvstore-slow", "expert-slow", "redis-latency", "prefill-stall", "decode-overload", "kvstore-kill", "expert-kill"]
COMPONENTS = {"router-0", "prefill-0", "decode-0", "decode-1", "kvstore-0", "expert-0", "expert-1"}


def fresh(selector: str) -> str:
    return f"min_over_time(up{{{selector}}}[6s])"


# PromQL that has a value once the fault shows in Prometheus (scrapes every 2 s).
SHOWS: dict[str, str] = {
    "kvstore-slow": 'max_over_time(scrape_duration_seconds{instance_id="kvstore-0"}[6s]) > 0.1',
    "expert-slow": 'max_over_time(scrape_duration_seconds{instance_id="expert-0"}[6s]) > 0.1',
    "redis-latency": "sum(rate(cleave_redis_command_seconds_sum[6s])) / sum(rate(cleave_redis_command_seconds_count[6s])) > 0.01",
    "prefill-stall": fresh('instance_id="prefill-0"') + " == 0",
    "decode-overload": 'sum(cleave_decode_waiting_requests{job="cleave"}) > 0',
    "kvstore-kill": fresh('instance_id="kvstore-0"') + " == 0",
    "expert-kill": fresh('instance_id="expert-0"') + " == 0",
}


class Traffic:
    """Bounded steady load: ``clients`` loops of one short completion then a pause, until stopped."""

    def __init__(self, platform: Platform, clients: int = 2, pause: float = 0.25) -> None:
        self.platform, self.pause = platform, pause
        self.stop = threading.Event()
        self.sent = self.ok = 0
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(clients)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.platform.base_url, timeout=30) as http:
            while not self.stop.is_set():
                prompt = [rng.randrange(5, 200) for _ in range(40)]
                try:
                    reply = http.post("/v1/completions", json={"model": self.platform.served_model_name, "prompt": prompt,
                                                               "max_tokens": 8, "temperature": 0, "ignore_eos": True})
                    self.ok += reply.status_code == 200
                except httpx.HTTPError:
                    pass  # a fault may fail requests; the load goes on
                self.sent += 1
                self.stop.wait(self.pause)

    def __enter__(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture(scope="module")
def platform(tiny_models, tmp_path_factory):
    p = Platform(tmp_path_factory.mktemp("platform-rca-e2e"), tiny_models["mixtral"], *UP_FLAGS, prometheus=True)
    p.prometheus = PrometheusAPI(f"http://127.0.0.1:{p.prometheus_port}")
    try:
        p.up()
        with Traffic(p) as traffic:
            p.traffic = traffic
            yield p
    finally:
        p.cleave("fault", "clear", timeout=400)
        p.down()


def value(platform: Platform, promql: str) -> float | None:
    try:
        return platform.prometheus.query_value(promql)
    except PrometheusUnavailable:
        return None


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Time at which ``condition`` first held; fails after ``timeout`` saying what was awaited."""
    assert wait_until(condition, timeout, interval=0.5), f"timed out after {timeout:.0f}s waiting for {what}"
    return time.time()


def newest_scrape(platform: Platform) -> float:
    return value(platform, 'max(timestamp(up{job="cleave",instance_id="router-0"}))') or 0.0


def healthy(platform: Platform) -> bool:
    """Every component scraped and up over the last scrapes, and the router answering."""
    try:
        up = platform.prometheus.query(fresh('job="cleave"'))
        states = {s["metric"].get("instance_id"): float(s["value"][1]) for s in up}
        return all(states.get(c) == 1 for c in COMPONENTS) and platform.complete([5] * 20, max_tokens=2).status_code == 200
    except (PrometheusUnavailable, httpx.HTTPError):
        return False


def fault(platform: Platform, *argv: str) -> dict | list:
    result = platform.cleave("fault", *argv, "--json", timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_agent_names_the_injected_component(platform, kind):
    began = time.monotonic()
    # A clean normal window: healthy again, then rates free of the previous fault, then NORMAL_SECONDS of rows.
    recovered = wait_for("the platform to be healthy", lambda: healthy(platform), 300)
    normal_start = recovered + RATE_WINDOW
    wait_for("a normal window in Prometheus", lambda: newest_scrape(platform) >= normal_start + NORMAL_SECONDS, 120)
    # A busy machine can briefly look like a mild fault: start from a calm moment.
    wait_for(f"{kind}'s signal to be absent before the fault", lambda: value(platform, SHOWS[kind]) is None, 60)

    record = fault(platform, "inject", kind, "--duration", str(FAULT_SECONDS))
    try:
        assert record["kind"] == kind and record["state"] == "active" and record["start"] >= recovered
        shown = wait_for(f"{kind} to show in Prometheus ({SHOWS[kind]})", lambda: value(platform, SHOWS[kind]) is not None, 60)
        wait_for("anomalous rows in Prometheus", lambda: newest_scrape(platform) >= shown + ANOMALY_SECONDS, 60)
        end = time.time()
    finally:
        cleared = fault(platform, "clear")
    # The window is over: the diagnosis of it runs while the platform recovers.
    result = platform.cleave(
        "diagnose", "--json", "--no-llm", "--quiet", "--prometheus-url", platform.prometheus.url,
        "--window", f"{end - normal_start:.0f}", "--end", f"{end:.3f}", "--step", str(STEP),
        "--anomaly-time", f"{record['start']:.3f}", "--redis-url", "", "--events-bootstrap", "", timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    root = report["root_cause"]
    ranking = [(c["component"], c["score"]) for c in report["candidates"]]
    print(f"{kind}: top {ranking}; rankers {report['rankers']}; {time.monotonic() - began:.0f}s")
    assert root is not None and root["component"] in record["components"], (
        f"{kind} injected into {record['components']}, the agent names {root and root['component']}; "
        f"candidates {ranking}; evidence {report['candidates'][:2]}")
    assert root["chosen_by"] == "statistics" and report["statistics_only"]
    top = report["candidates"][0]
    assert top["evidence"] and all(e["series"].startswith(root["component"] + "_") and e["promql"] for e in top["evidence"])
    # The quoted PromQL is real: Prometheus answers it with the series over the window.
    shown_series = platform.prometheus.query_range(root["promql"], normal_start, end, STEP)
    assert shown_series and shown_series[0]["values"], root["promql"]

    assert [r["id"] for r in cleared] == [record["id"]] and cleared[0]["state"] == "cleared"
    listed = {r["id"]: r for r in fault(platform, "list")}
    assert listed[record["id"]]["ended_at"] >= listed[record["id"]]["start"]
