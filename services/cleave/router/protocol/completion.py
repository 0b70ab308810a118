"""``/v1/completions``: request, response and stream-chunk models."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from cleave.router.errors import APIError
from cleave.router.protocol.common import OpenAIBaseModel, SamplingRequest, UsageInfo, unsupported

# The legacy completions API documents 16 as its default; chat has no default.
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "best_of must be 1: several candidates per request are not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix is not supported")
        if self.logprobs is not None and self.logprobs > 1:
            raise unsupported(
                "logprobs", "logprobs must be 0 or 1: only the sampled token's log-probability is available"
            )

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request; batches are refused with a clear 400."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise unsupported("prompt", "batched prompts are not supported: send one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return prompt


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(OpenAIBaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None

    def dump(self, include_usage_field: bool) -> dict[str, Any]:
        data = self.model_dump()
        if not include_usage_field:
            data.pop("usage")
        return data
