"""Pieces shared by the completion and chat endpoints: usage, errors, and the
sampling fields both requests carry."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cleave.engine.sampling_params import SamplingParams
from cleave.router.errors import APIError

MAX_SEED = 2**64 - 1


class OpenAIBaseModel(BaseModel):
    # Clients send fields we do not know (``store``, ``metadata``, vendor extensions);
    # OpenAI-compatible servers ignore them rather than fail the request.
    model_config = ConfigDict(extra="ignore")


class PromptTokensDetails(OpenAIBaseModel):
    cached_tokens: int = 0


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


class SamplingRequest(OpenAIBaseModel):
    """Fields that both ``/v1/completions`` and ``/v1/chat/completions`` accept."""

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # -1 is vLLM's spelling of "off"
    seed: int | None = Field(default=None, ge=-(2**63), le=MAX_SEED)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        """Reject parameters the engine cannot honour instead of silently ignoring them."""
        if self.n != 1:
            raise unsupported("n", "n must be 1: several choices per request are not supported")
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if getattr(self, name) != neutral:
                raise unsupported(name, f"{name} is not supported")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        for stop in self.stop_strings:
            if not stop:
                raise APIError(400, "stop strings must not be empty", param="stop")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_tokens: int, logprobs: bool) -> SamplingParams:
        try:
            return SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=max(self.top_k, 0),
                max_tokens=max_tokens,
                seed=self.seed,
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
            )
        except ValueError as exc:
            raise APIError(400, str(exc)) from None


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")
