"""/metrics of one service's own Prometheus registry, on its own HTTP port. Registries
per service (not the global one) let several services share a test process."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import MetricsHandler

from cleave.common import redis_metrics


class MetricsHTTPServer:
    def __init__(self, registry: CollectorRegistry, name: str = "metrics") -> None:
        self.registry = registry
        self.name = name
        # Every service shows its process (CPU, memory) and its view of Redis.
        ProcessCollector(registry=registry)
        redis_metrics.register(registry)
        self._http: ThreadingHTTPServer | None = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on ``host:port`` (0: a free port) from a thread; returns the port."""
        self._http = ThreadingHTTPServer((host, port), MetricsHandler.factory(self.registry))
        self._http.daemon_threads = True
        # A short poll keeps shutdown (every drain, every test) from waiting half a second.
        threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, name=self.name, daemon=True
        ).start()
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
