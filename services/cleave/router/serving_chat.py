"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse

from cleave.router.errors import APIError
from cleave.router.generation import Generation
from cleave.router.protocol.chat import (
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    TopLogprob,
)
from cleave.router.serving import SSE_DONE, OpenAIServing, SSEResponse, TextEvents, safe_logprob, sse_event


class OpenAIServingChat(OpenAIServing):
    request_id_prefix = "chatcmpl"
    endpoint = "chat_completions"

    def render(self, request: ChatCompletionRequest) -> list[int]:
        """The conversation through the model's chat template, as token ids."""
        try:
            text = self.tokenizer.apply_chat_template(
                request.template_messages(), add_generation_prompt=request.add_generation_prompt
            )
        except (ValueError, jinja2.TemplateError) as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None
        # The template writes the special tokens (BOS included) itself.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prepare(self, request: ChatCompletionRequest) -> tuple[list[int], int]:
        """Check a request; return its rendered prompt's token ids and output budget."""
        self.check_model(request.model)
        request.check_supported()
        prompt_ids = self.render(request)
        return prompt_ids, self.resolve_max_tokens(len(prompt_ids), request.requested_max_tokens, None, "messages")

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> JSONResponse | SSEResponse:
        request_id = self.new_request_id()
        prompt_ids, max_tokens = self.admit(request, request_id)
        generation = await self.start(request, request_id, prompt_ids, max_tokens, logprobs=request.logprobs)
        headers = self.response_headers(generation)
        if request.stream:
            return SSEResponse(self.guard_stream(generation, self._stream(request, generation)), headers=headers)
        text, token_ids, logprobs = await self.run_to_end(generation, raw_request)
        response = ChatCompletionResponse(
            id=request_id,
            model=self.served_model_name,
            choices=[
                ChatCompletionResponseChoice(
                    message=ChatResponseMessage(content=text),
                    logprobs=self._logprobs(request, token_ids, logprobs) if request.logprobs else None,
                    finish_reason=generation.finish_reason,
                )
            ],
            usage=self.usage(generation),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    async def _stream(self, request: ChatCompletionRequest, generation: Generation) -> AsyncIterator[str]:
        include_usage = request.include_usage
        created = int(time.time())  # one for every chunk of the stream, as OpenAI's

        def response(delta: DeltaMessage, finish_reason=None, logprobs=None) -> ChatCompletionStreamResponse:
            choice = ChatCompletionResponseStreamChoice(delta=delta, logprobs=logprobs, finish_reason=finish_reason)
            return ChatCompletionStreamResponse(
                id=generation.request_id, model=self.served_model_name, created=created, choices=[choice]
            )

        def chunk(delta: DeltaMessage, finish_reason=None, logprobs=None) -> str:
            return sse_event(response(delta, finish_reason, logprobs).dump(include_usage))

        text_events = None if request.logprobs else TextEvents(
            response(DeltaMessage(content=TextEvents.MARK)).dump(include_usage))
        yield chunk(DeltaMessage(role="assistant", content=""))
        async with aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                logprobs = None
                if request.logprobs and delta.token_ids:
                    logprobs = self._logprobs(request, delta.token_ids, delta.logprobs)
                # A chunk per engine output, empty while a character is incomplete, as
                # vLLM streams them (and as completions do).
                if delta.text or delta.token_ids:
                    if text_events is not None:
                        yield text_events.event(delta.text)
                    else:
                        yield chunk(DeltaMessage(content=delta.text), logprobs=logprobs)
                if delta.finish_reason is not None:
                    yield chunk(DeltaMessage(), finish_reason=delta.finish_reason)
        if include_usage:
            usage = ChatCompletionStreamResponse(
                id=generation.request_id, model=self.served_model_name, created=created, choices=[],
                usage=self.usage(generation),
            )
            yield sse_event(usage.dump(True))
        yield SSE_DONE

    def _logprobs(self, request: ChatCompletionRequest, token_ids: list[int], logprobs: list[float]):
        content = []
        for i, token_id in enumerate(token_ids):
            token = self.token_text(token_id)
            logprob = safe_logprob(logprobs[i] if i < len(logprobs) else None)
            token_bytes = list(token.encode("utf-8"))
            top = [TopLogprob(token=token, logprob=logprob, bytes=token_bytes)] if request.top_logprobs else []
            content.append(ChatCompletionLogProb(token=token, logprob=logprob, bytes=token_bytes, top_logprobs=top))
        return ChatCompletionLogProbs(content=content)
