"""``DecodeConfig``: the engine's fields plus the worker's (cleave.common.kv_handoff.WorkerConfig);
flags ``--max-num-seqs``, environment ``CLEAVE_MAX_NUM_SEQS``, Helm
value ``decode.maxNumSeqs``."""

from __future__ import annotations

from dataclasses import dataclass, field

from cleave.common.kv_handoff import WorkerConfig

DEFAULT_PORT = 50080
DEFAULT_METRICS_PORT = 9480


@dataclass(slots=True)
class DecodeConfig(WorkerConfig):
    """The decode worker."""

    port: int = field(default=DEFAULT_PORT, metadata={"help": "gRPC port; 0 picks a free one"})
    metrics_port: int = field(default=DEFAULT_METRICS_PORT, metadata={"help": "Prometheus /metrics port; 0 picks a free one"})

    @property
    def role(self) -> str:
        return "decode"
