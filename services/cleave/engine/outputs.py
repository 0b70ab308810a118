from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncGenerator, Protocol

from cleave.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request: only the *new* tokens."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos / stop token), "length", "abort"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative, including new_token_ids
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Role -> instance id of the workers serving the request ({"prefill": ..., "decode": ...}),
    # set by a remote engine client on the first output and again after a failover;
    # empty for the in-process engine.
    served_by: dict[str, str] = field(default_factory=dict)


class ServiceUnavailableError(RuntimeError):
    """The request cannot be served now (no worker or replica to run it); the caller may
    retry later. Front ends answer HTTP 503 / gRPC UNAVAILABLE."""


class EngineClient(Protocol):
    """What a front end (the REST/gRPC server) needs from an engine, local or remote."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream outputs until one has ``finished``. Closing the iterator early aborts
        the request and frees its KV blocks."""
        ...

    async def abort(self, request_id: str) -> None: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def is_running(self) -> bool:
        """Whether requests can be served now (the /health answer)."""
        ...
