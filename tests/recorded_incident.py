"""A recorded incident in a real Prometheus: the platform's metrics, as its services name and
label them, written as OpenMetrics and backfilled with ``promtool tsdb
create-blocks-from openmetrics`` into the data folder of a Prometheus that then serves them.

The incident is planted, so its root cause is known: at ``fault`` the KV store ``kvstore-0``
answers 50 times slower; one scrape later the prefill and decode workers, which wait on it,
slow down, and one more later the router's TTFT rises. Everything else carries only noise.
Backfilled data makes the agent's tests deterministic and instant where a live platform
would need minutes of scrapes and a fault injector."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np

STEP = 2.0
BEFORE = 480.0
AFTER = 240.0
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMPONENTS = {"router-0": "router", "prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode",
              "kvstore-0": "kvstore"}
ROOT_CAUSE = "kvstore-0"


class Incident:
    """The samples of every series between ``fault - BEFORE`` and ``fault + after``."""

    def __init__(self, fault: float, seed: int = 7, after: float = AFTER) -> None:
        self.fault = fault
        self.times = np.arange(fault - BEFORE, fault + after + STEP / 2, STEP)
        self.rng = np.random.default_rng(seed)
        self.series: dict[str, list[tuple[dict[str, str], np.ndarray]]] = {}

    def _add(self, name: str, labels: dict[str, str], values: np.ndarray) -> None:
        self.series.setdefault(name, []).append((labels, values))

    def _noisy(self, level: float, after: float | None = None, delay_steps: int = 0) -> np.ndarray:
        base = np.full(len(self.times), level)
        if after is not None:
            base[self.times >= self.fault + delay_steps * STEP] = after
        return base * (1 + 0.05 * self.rng.standard_normal(len(self.times)))

    def gauge(self, name: str, labels: dict[str, str], level: float, after: float | None = None,
              delay_steps: int = 0) -> None:
        self._add(name, labels, np.maximum(self._noisy(level, after, delay_steps), 0.0))

    def counter(self, name: str, labels: dict[str, str], rate: float) -> np.ndarray:
        increments = np.maximum(self._noisy(rate), 0.0) * STEP
        self._add(name, labels, np.cumsum(increments))
        return increments

    def histogram(self, name: str, labels: dict[str, str], rate: float, mean: float, after: float | None = None,
                  delay_steps: int = 0) -> None:
        """Every observation of a scrape interval at that interval's (noisy) mean."""
        counts = np.maximum(self._noisy(rate), 0.0) * STEP
        means = np.maximum(self._noisy(mean, after, delay_steps), 1e-6)
        self._add(f"{name}_count", labels, np.cumsum(counts))
        self._add(f"{name}_sum", labels, np.cumsum(counts * means))
        for le in (*BUCKETS, math.inf):
            self._add(f"{name}_bucket", {**labels, "le": "+Inf" if le == math.inf else repr(le)},
                      np.cumsum(np.where(means <= le, counts, 0.0)))

    def build(self) -> "Incident":
        for i, (instance_id, role) in enumerate(COMPONENTS.items()):
            labels = {"job": "cleave", "role": role, "instance_id": instance_id, "instance": f"127.0.0.1:{9460 + i}"}
            self.gauge("up", labels, 1.0)
            self.series["up"][-1] = (labels, np.ones(len(self.times)))
            self.gauge("scrape_duration_seconds", labels, 0.004)
            self.counter("process_cpu_seconds_total", labels, 0.3)
            if role == "router":
                self.counter("cleave_router_requests_total", {**labels, "endpoint": "completions", "outcome": "success"}, 4.0)
                self.histogram("cleave_router_time_to_first_token_seconds", labels, 4.0, 0.3, 0.9, delay_steps=2)
                self.histogram("cleave_router_inter_token_latency_seconds", labels, 40.0, 0.05)
                self.histogram("cleave_router_e2e_request_latency_seconds", labels, 4.0, 1.0, 1.6, delay_steps=2)
                self.gauge("cleave_router_requests_running", labels, 3.0)
            elif role in ("prefill", "decode"):
                rate, latency, slow = (4.0, 0.25, 0.7) if role == "prefill" else (2.0, 0.8, 1.1)
                self.counter(f"cleave_{role}_requests_total", {**labels, "outcome": "ok"}, rate)
                self.histogram(f"cleave_{role}_request_seconds", labels, rate, latency, slow, delay_steps=1)
                self.gauge(f"cleave_{role}_running_requests", labels, 2.0)
                self.gauge(f"cleave_{role}_free_kv_blocks", labels, 200.0)
            else:
                for op in ("get", "put"):
                    self.histogram("cleave_kvstore_transfer_seconds", {**labels, "op": op}, 4.0, 0.004, 0.2)
                self.counter("cleave_kvstore_hits_total", {**labels, "op": "get", "tier": "memory"}, 6.0)
                self.gauge("cleave_kvstore_stored_bytes", labels, 1e7)
        return self

    def openmetrics(self) -> str:
        lines = []
        for name, series in self.series.items():
            lines.append(f"# TYPE {name} unknown")
            for labels, values in series:
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines += [f"{name}{{{text}}} {v:.9g} {t:.3f}" for t, v in zip(self.times, values)]
        return "\n".join(lines) + "\n# EOF\n"


class RecordedPrometheus:
    """A Prometheus on ``port`` serving ``incident`` from backfilled blocks, scraping nothing."""

    def __init__(self, root: Path, incident: Incident, port: int) -> None:
        self.root, self.incident, self.port = root, incident, port
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "RecordedPrometheus":
        data = self.root / "data"
        source = self.root / "incident.om"
        source.write_text(self.incident.openmetrics())
        made = subprocess.run([shutil.which("promtool") or "promtool", "tsdb", "create-blocks-from", "openmetrics",
                               str(source), str(data)], capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        config = self.root / "prometheus.yml"
        config.write_text("global: {scrape_interval: 15s}\nscrape_configs: []\n")
        self.process = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=30d"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / "prometheus.log", "w"))
        deadline = time.monotonic() + timeout
        while not self._ready():
            assert self.process.poll() is None, (self.root / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus did not become ready"
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
