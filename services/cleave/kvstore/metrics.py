"""Prometheus metrics of one KV store, in a registry of its own (so that several stores
can live in one test process) served on its own HTTP port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cleave.common.metrics_http import MetricsHTTPServer
from cleave.kvstore.backend import StorageBackend

_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class KVStoreMetrics(MetricsHTTPServer):
    """``cleave_kvstore_*``: lookups, occupancy, evictions and transfers."""

    def __init__(self, backend: StorageBackend, instance_id: str) -> None:
        super().__init__(CollectorRegistry(), "kvstore-metrics")
        labels = {"instance_id": instance_id}
        r = self.registry
        self.tier = backend.tier
        self.hits = Counter(
            "cleave_kvstore_hits", "Blocks found, by operation (get, contains) and tier", ["op", "tier"], registry=r
        )
        self.misses = Counter(
            "cleave_kvstore_misses", "Blocks not found, by operation (get, contains) and tier", ["op", "tier"], registry=r
        )
        self.evictions = Counter("cleave_kvstore_evictions", "Blocks evicted to make room", registry=r)
        self.transfer_bytes = Counter(
            "cleave_kvstore_transfer_bytes", "Block bytes received (in) and sent (out)", ["direction"], registry=r
        )
        self.transfer_seconds = Histogram(
            "cleave_kvstore_transfer_seconds", "Duration of PutBlocks and GetBlocks streams", ["op"],
            buckets=_SECONDS_BUCKETS, registry=r,
        )
        self.blocks_put = Counter("cleave_kvstore_blocks_put", "Blocks stored", registry=r)
        self.rejected = Counter(
            "cleave_kvstore_rejected_requests", "Calls refused, by gRPC status code", ["code"], registry=r
        )
        self.index_errors = Counter("cleave_kvstore_index_errors", "Failed writes of the Redis KV index", registry=r)
        info = Gauge("cleave_kvstore_info", "Constant 1, labelled with the store's identity", list(labels), registry=r)
        info.labels(**labels).set(1)
        for name, doc, read in (
            ("cleave_kvstore_stored_bytes", "Bytes of blocks held", lambda s: s.num_bytes),
            ("cleave_kvstore_stored_blocks", "Blocks held", lambda s: s.num_blocks),
            ("cleave_kvstore_capacity_bytes", "Capacity of the memory tier", lambda s: s.capacity_bytes),
            ("cleave_kvstore_pinned_blocks", "Blocks whose pin has not lapsed", lambda s: s.num_pinned),
        ):
            Gauge(name, doc, registry=r).set_function(lambda read=read: read(backend.stats()))
