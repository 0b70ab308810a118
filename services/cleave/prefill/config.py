"""``PrefillConfig``: the engine's fields plus the worker's (cleave.common.kv_handoff.WorkerConfig);
flags ``--max-num-batched-tokens``, environment ``CLEAVE_MAX_NUM_BATCHED_TOKENS``, Helm
value ``prefill.maxNumBatchedTokens``."""

from __future__ import annotations

from dataclasses import dataclass, field

from cleave.common.kv_handoff import WorkerConfig

DEFAULT_PORT = 50070
DEFAULT_METRICS_PORT = 9470


@dataclass(slots=True)
class PrefillConfig(WorkerConfig):
    """The prefill worker."""

    port: int = field(default=DEFAULT_PORT, metadata={"help": "gRPC port; 0 picks a free one"})
    metrics_port: int = field(default=DEFAULT_METRICS_PORT, metadata={"help": "Prometheus /metrics port; 0 picks a free one"})

    @property
    def role(self) -> str:
        return "prefill"
