"""One generation as the HTTP handlers see it: engine outputs in, safe text out.

Both endpoints, streaming or not, run a request through ``Generation``; it owns the
engine stream, detokenizes, applies stop strings, feeds the metrics, and makes sure
the engine request is aborted whenever the caller stops early (stop string, client
gone, error)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import AsyncGenerator, AsyncIterator, Sequence

import anyio

from cleave.engine.outputs import EngineClient, RequestOutput
from cleave.engine.sampling_params import SamplingParams
from cleave.events.lifecycle import events_of
from cleave.router.errors import APIError
from cleave.router.detokenizer import IncrementalDetokenizer, StopStringMatcher
from cleave.router.metrics import RequestTracker

logger = logging.getLogger("cleave.router")


@dataclass(slots=True)
class TextDelta:
    """What one engine step added to the response."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class GenerationUsage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Generation:
    """Runs one request on an ``EngineClient``: ``await start()``, then iterate
    ``stream()`` once; ``usage`` is complete when the stream ends. Whoever starts a
    generation must make sure ``close()`` runs, even if ``stream()`` never does."""

    def __init__(
        self,
        engine: EngineClient,
        decoder,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        stop: Sequence[str],
        tracker: RequestTracker,
    ) -> None:
        self.engine = engine
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.detokenizer = IncrementalDetokenizer(decoder)
        self.stop = StopStringMatcher(stop)
        self.tracker = tracker
        self.events = events_of(engine).request(request_id, tracker.arrival)
        self.usage = GenerationUsage(prompt_tokens=len(prompt_token_ids))
        self.finish_reason: str | None = None
        self._served_by: dict[str, str] = {}
        self._outputs: AsyncGenerator[RequestOutput, None] | None = None
        self._first: RequestOutput | None = None
        self._closed = False

    async def start(self) -> None:
        """Submit the request and wait for the engine's first output, so that a request
        the engine refuses fails as an HTTP error before any byte of the response."""
        self.tracker.on_dispatch()
        self._outputs = self.engine.generate(self.request_id, self.prompt_token_ids, self.params)
        self.events.admitted()
        self.tracker.metrics.running.inc()
        self.tracker.metrics.prompt_tokens.inc(len(self.prompt_token_ids))
        try:
            self._first = await self._next()
            self._served_by.update(self._first.served_by)
        except StopAsyncIteration:
            await self.close()
            raise RuntimeError("the engine ended the request without an output") from None
        except ValueError as exc:
            # The engine's ValueErrors are its verdict on the request itself.
            await self.close()
            raise APIError(400, str(exc), code="invalid_request") from None
        except BaseException:
            await self.close()
            raise

    @property
    def served_by(self) -> dict[str, str]:
        """Role -> instance id of the workers serving the request, as the engine last
        reported them (known after ``start()``; empty for the in-process engine)."""
        return dict(self._served_by)

    async def stream(self) -> AsyncIterator[TextDelta]:
        """The response text, step by step; the last delta carries the finish reason."""
        assert self._outputs is not None, "start() first"
        try:
            output = self._first
            while True:
                yield self._step(output)
                if self.finish_reason is not None:
                    return
                output = await self._next()
        finally:
            await self.close()

    def _step(self, output: RequestOutput) -> TextDelta:
        self._served_by.update(output.served_by)
        if output.num_prompt_tokens:
            self.usage.prompt_tokens = output.num_prompt_tokens
        if output.num_cached_tokens > self.usage.cached_tokens:
            self.tracker.metrics.cached_tokens.inc(output.num_cached_tokens - self.usage.cached_tokens)
            self.usage.cached_tokens = output.num_cached_tokens
        delta = self._consume(output.new_token_ids, output.new_logprobs)
        if self.finish_reason is None and output.finished:
            delta.text += self._finish_text()
            if self.finish_reason is None:
                self.finish_reason = output.finish_reason or "stop"
        delta.finish_reason = self.finish_reason
        if delta.finish_reason is not None:
            self.tracker.on_finish(self.finish_reason)
            self.events.finished(self.finish_reason, self.usage.prompt_tokens, self.usage.completion_tokens)
        return delta

    async def _next(self) -> RequestOutput:
        try:
            return await anext(self._outputs)
        except BaseException as exc:
            self.events.failed(exc)
            raise

    async def close(self) -> None:
        """Release the engine request: abort it unless it finished. Idempotent, and
        safe in a cancelled task."""
        if self._closed or self._outputs is None:
            return
        self._closed = True
        # A cancelled task may not await; the shield lets the abort reach the engine.
        # Closing the engine's stream is the abort (the EngineClient contract): it frees
        # an unfinished request, whether a stop string ended it or the client left.
        with anyio.CancelScope(shield=True):
            try:
                await self._outputs.aclose()
            except Exception:
                logger.exception("aborting request failed", extra={"request_id": self.request_id})
            finally:
                self.tracker.metrics.running.dec()
                self.events.closed(self.usage.prompt_tokens, self.usage.completion_tokens)

    def _consume(self, token_ids: Sequence[int], logprobs: Sequence[float]) -> TextDelta:
        delta = TextDelta(text="")
        for i, token_id in enumerate(token_ids):
            delta.token_ids.append(token_id)
            if i < len(logprobs):
                delta.logprobs.append(logprobs[i])
            self.usage.completion_tokens += 1
            delta.text += self.stop.feed(self.detokenizer.add([token_id]))
            if self.stop.matched is not None:
                self.finish_reason = "stop"
                break
        self.tracker.on_tokens(len(delta.token_ids))
        self.events.on_tokens(len(delta.token_ids))
        return delta

    def _finish_text(self) -> str:
        text = self.stop.feed(self.detokenizer.flush())
        if self.stop.matched is not None:
            self.finish_reason = "stop"
            return text
        return text + self.stop.flush()
