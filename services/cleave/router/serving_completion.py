"""``POST /v1/completions``."""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from cleave.router.generation import Generation
from cleave.router.protocol.completion import (
    DEFAULT_MAX_TOKENS,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
)
from cleave.router.serving import SSE_DONE, OpenAIServing, SSEResponse, TextEvents, safe_logprob, sse_event


class OpenAIServingCompletion(OpenAIServing):
    request_id_prefix = "cmpl"
    endpoint = "completions"

    def prepare(self, request: CompletionRequest) -> tuple[list[int], int]:
        """Check a request; return its prompt token ids and output budget."""
        self.check_model(request.model)
        request.check_supported()
        prompt = request.single_prompt()
        if isinstance(prompt, str):
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            self.check_token_ids(prompt, "prompt")
            prompt_ids = list(prompt)
        return prompt_ids, self.resolve_max_tokens(len(prompt_ids), request.max_tokens, DEFAULT_MAX_TOKENS, "prompt")

    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> JSONResponse | SSEResponse:
        request_id = self.new_request_id()
        prompt_ids, max_tokens = self.admit(request, request_id)
        generation = await self.start(request, request_id, prompt_ids, max_tokens, logprobs=request.logprobs is not None)
        headers = self.response_headers(generation)
        if request.stream:
            return SSEResponse(self.guard_stream(generation, self._stream(request, generation)), headers=headers)
        text, token_ids, logprobs = await self.run_to_end(generation, raw_request)
        response = CompletionResponse(
            id=request_id,
            model=self.served_model_name,
            choices=[
                CompletionResponseChoice(
                    text=text,
                    logprobs=self._logprobs(token_ids, logprobs, 0) if request.logprobs is not None else None,
                    finish_reason=generation.finish_reason,
                )
            ],
            usage=self.usage(generation),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    async def _stream(self, request: CompletionRequest, generation: Generation) -> AsyncIterator[str]:
        offset = 0
        include_usage = request.include_usage
        created = int(time.time())  # one for every chunk of the stream, as OpenAI's

        def response(choices: list[CompletionResponseStreamChoice], usage=None) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=generation.request_id, model=self.served_model_name, created=created,
                                            choices=choices, usage=usage)

        text_events = None if request.logprobs is not None else TextEvents(
            response([CompletionResponseStreamChoice(text=TextEvents.MARK)]).dump(include_usage))
        async with aclosing(generation.stream()) as deltas:
            async for delta in deltas:
                # A token whose text ends inside a character still gets its chunk, with no
                # text (as vLLM streams it): the client sees each token when it is made.
                if not delta.text and delta.finish_reason is None and not delta.token_ids:
                    continue
                if text_events is not None and delta.finish_reason is None:
                    yield text_events.event(delta.text)
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._logprobs(delta.token_ids, delta.logprobs, offset)
                offset += len(delta.text)
                choice = CompletionResponseStreamChoice(
                    text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason)
                yield sse_event(response([choice]).dump(include_usage))
        if include_usage:
            yield sse_event(response([], usage=self.usage(generation)).dump(True))
        yield SSE_DONE

    def _logprobs(self, token_ids: list[int], logprobs: list[float], offset: int) -> CompletionLogProbs:
        out = CompletionLogProbs()
        for i, token_id in enumerate(token_ids):
            token = self.token_text(token_id)
            logprob = safe_logprob(logprobs[i]) if i < len(logprobs) else None
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append({token: logprob} if logprob is not None else None)
            out.text_offset.append(offset)
            offset += len(token)
        return out
