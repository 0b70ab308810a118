"""``ExpertConfig``: flags ``--experts``, environment ``CLEAVE_EXPERTS``, Helm value
``experts.experts`` (see cleave.common.config)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from cleave.common.registry import DEFAULT_REDIS_URL

DEFAULT_PORT = 50090
DEFAULT_METRICS_PORT = 9490


@dataclass(slots=True)
class ExpertConfig:
    """One expert replica: the (layer, expert) pairs it holds, and where it serves them."""

    model: str = field(default="", metadata={"help": "path to a Hugging Face MoE model folder"})
    experts: str = field(
        default="all",
        metadata={"help": "experts held: '0-3' or '0,2' (of every MoE layer), 'L:E' items like '0:0-3,1:4-7', or 'all'"},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16 or float16; callers must send this dtype"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind the gRPC server to"})
    port: int = field(default=DEFAULT_PORT, metadata={"help": "gRPC port; 0 picks a free one"})
    stream_port: int = field(
        default=0,
        metadata={"help": "port of the RunExperts stream that callers prefer to gRPC (docs/expert.md); "
                          "0 picks a free one, -1 turns it off"},
    )
    advertise_address: str = field(
        default="", metadata={"help": "host:port registered for other services to dial; default: host:port"}
    )
    metrics_port: int = field(default=DEFAULT_METRICS_PORT, metadata={"help": "Prometheus /metrics port; 0 picks a free one, -1 disables"})
    redis_url: str = field(default=DEFAULT_REDIS_URL, metadata={"help": "Redis for the registry; empty: standalone"})
    instance_id: str = field(default="", metadata={"help": "registry id; default: expert-<hostname>-<pid>"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 leaves torch's default"})
    inline_max_tokens: int = field(
        default=-1,
        metadata={"help": "calls of at most this many tokens run on the event loop, larger ones on a worker "
                          "thread; -1: 256 with one torch thread, 64 with more (docs/expert.md)"},
    )
    registry_ttl_seconds: float = field(default=5.0, metadata={"help": "registration expiry without heartbeats"})
    drain_grace_seconds: float = field(default=10.0, metadata={"help": "time in-flight calls get to finish on SIGTERM"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model is required (a Hugging Face MoE model folder)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], not {self.port}")
        if not -1 <= self.stream_port < 65536:
            raise ValueError(f"stream_port must be in [-1, 65535], not {self.stream_port}")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in [-1, 65535], not {self.metrics_port}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, not {self.num_threads}")
        if self.inline_max_tokens < -1:
            raise ValueError(f"inline_max_tokens must be >= 0, or -1 for the default, not {self.inline_max_tokens}")
        if self.registry_ttl_seconds < 0.5:
            raise ValueError(f"registry_ttl_seconds must be >= 0.5, not {self.registry_ttl_seconds}")
        if self.drain_grace_seconds < 0:
            raise ValueError(f"drain_grace_seconds must be >= 0, not {self.drain_grace_seconds}")
        if not self.instance_id:
            self.instance_id = f"expert-{socket.gethostname()}-{os.getpid()}"
        if ":" in self.instance_id:
            raise ValueError(f"instance_id must not contain ':', got {self.instance_id!r}")
