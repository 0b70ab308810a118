"""``/v1/chat/completions``: request, response and stream-chunk models."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field

from cleave.router.errors import APIError
from cleave.router.protocol.common import OpenAIBaseModel, SamplingRequest, UsageInfo, unsupported


class ChatMessage(OpenAIBaseModel):
    """One message of the conversation, as the client sent it."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Parts stay loose here so that a non-text part gets our own message, naming
    # the part, rather than pydantic's union error.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ResponseFormat(OpenAIBaseModel):
    type: str


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise APIError(400, "messages must contain at least one message", param="messages")
        if self.tools:
            raise unsupported("tools", "tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool_choice is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise unsupported("response_format", f"response_format {self.response_format.type!r} is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs > 1:
            raise unsupported(
                "top_logprobs", "top_logprobs must be 0 or 1: only the sampled token's log-probability is available"
            )
        for i, message in enumerate(self.messages):
            if message.role == "tool" or message.tool_calls:
                raise unsupported(f"messages[{i}]", "tool messages and tool calls are not supported")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        """The conversation as the chat template expects it: roles and plain text."""
        out = []
        for i, message in enumerate(self.messages):
            role = "system" if message.role == "developer" else message.role
            out.append({"role": role, "content": _text_of(message.content, f"messages[{i}].content")})
        return out


def _text_of(content: str | list[dict[str, Any]] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text":
            raise unsupported(f"{param}[{j}]", f"content part type {kind!r} is not supported: only 'text' parts are")
        text = part.get("text")
        if not isinstance(text, str):
            raise APIError(400, f"{param}[{j}].text must be a string", param=f"{param}[{j}].text")
        texts.append(text)
    return "".join(texts)


class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProb(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIBaseModel):
    content: list[ChatCompletionLogProb] | None = None


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None

    def dump(self, include_usage_field: bool) -> dict[str, Any]:
        data = self.model_dump()
        for choice in data["choices"]:
            # OpenAI leaves unset delta fields out of the chunk rather than sending nulls.
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if not include_usage_field:
            data.pop("usage")
        return data
