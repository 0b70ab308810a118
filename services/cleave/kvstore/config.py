"""``KVStoreConfig``: flags ``--capacity-mb``, environment ``CLEAVE_CAPACITY_MB``, Helm
value ``kvstore.capacityMb`` (see cleave.common.config)."""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

from cleave.common.grpc_server import MAX_MESSAGE_BYTES
from cleave.common.registry import DEFAULT_REDIS_URL

DEFAULT_PORT = 50060
DEFAULT_METRICS_PORT = 9460


@dataclass(slots=True)
class KVStoreConfig:
    """The KV-cache store service."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "gRPC port; 0 picks a free one"})
    advertise_address: str = field(
        default="", metadata={"help": "host:port registered for other services to dial; default: host:port"}
    )
    metrics_port: int = field(default=DEFAULT_METRICS_PORT, metadata={"help": "Prometheus /metrics port; 0 picks a free one"})
    capacity_mb: float = field(default=1024.0, metadata={"help": "memory tier capacity in MiB"})
    chunk_bytes: int = field(default=1 << 20, metadata={"help": "largest chunk of a block in a GetBlocks stream"})
    redis_url: str = field(
        default=DEFAULT_REDIS_URL, metadata={"help": "Redis for the registry and the KV index; empty: standalone"}
    )
    instance_id: str = field(default="", metadata={"help": "registry id; default: kvstore-<hostname>-<pid>"})
    registry_ttl_seconds: float = field(default=5.0, metadata={"help": "registration expiry without heartbeats"})
    drain_grace_seconds: float = field(default=10.0, metadata={"help": "time in-flight calls get to finish on SIGTERM"})

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in [0, 65535], not {getattr(self, name)}")
        if not (math.isfinite(self.capacity_mb) and self.capacity_mb > 0):
            raise ValueError(f"capacity_mb must be > 0, not {self.capacity_mb}")
        # A chunk plus its message framing must fit in one gRPC message.
        if not 1 <= self.chunk_bytes <= MAX_MESSAGE_BYTES // 2:
            raise ValueError(f"chunk_bytes must be in [1, {MAX_MESSAGE_BYTES // 2}], not {self.chunk_bytes}")
        if self.registry_ttl_seconds < 0.5:
            raise ValueError(f"registry_ttl_seconds must be >= 0.5, not {self.registry_ttl_seconds}")
        if self.drain_grace_seconds < 0:
            raise ValueError(f"drain_grace_seconds must be >= 0, not {self.drain_grace_seconds}")
        if not self.instance_id:
            self.instance_id = f"kvstore-{socket.gethostname()}-{os.getpid()}"
        if ":" in self.instance_id:
            raise ValueError(f"instance_id must not contain ':', got {self.instance_id!r}")

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_mb * 2**20)
