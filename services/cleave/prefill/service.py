"""The ``cleave.v1.Prefill`` service: one prompt in, its first token and its KV blocks
in the store out."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import AsyncIterator

import grpc

from cleave.common.kv_handoff import WorkerServer, abort_engine_error, abort_invalid, request_tokens
from cleave.common.wire import FINISH_REASONS, params_from_proto
from cleave.engine.async_engine import EngineDeadError, EngineStepError
from cleave.protogen.cleave.v1 import common_pb2
from cleave.protogen.cleave.v1 import prefill_pb2 as pb
from cleave.protogen.cleave.v1 import prefill_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.prefill")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prefill"].full_name


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, server: "PrefillServer") -> None:
        self.server = server
        self.num_queued_prompt_tokens = 0

    async def Prefill(self, request: pb.PrefillRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.PrefillResponse]:
        server = self.server
        metrics = server.metrics
        engine = server.engine.engine
        started = time.perf_counter()
        try:
            prompt = request_tokens(request.request_id, request.token_ids, "nothing to prefill")
            params = params_from_proto(request.params)
            # The prefill pool only ever holds prompt + 1 token; decode checks the rest.
            engine_params = dataclasses.replace(params, max_tokens=1)
            engine.validate(prompt, engine_params)
            stores = server.handoff.resolve(request.kvstore_targets)
        except ValueError as exc:
            await abort_invalid(metrics, context, exc)

        hashes = engine.block_hashes(prompt)
        fetched = await server.handoff.import_prefix(server.engine, hashes, prompt, stores)
        if fetched is not None:
            metrics.count_transfer("fetched", fetched)

        self.num_queued_prompt_tokens += len(prompt)
        queued = True
        output = None
        try:
            async for output in server.engine.generate(request.request_id, prompt, engine_params):
                if queued:
                    self.num_queued_prompt_tokens -= len(prompt)
                    queued = False
        except ValueError as exc:
            await abort_invalid(metrics, context, exc)
        except (EngineDeadError, EngineStepError) as exc:
            metrics.requests.labels(outcome="error").inc()
            await abort_engine_error(context, exc)
        finally:
            if queued:
                self.num_queued_prompt_tokens -= len(prompt)
        if output is None or not output.new_token_ids:
            metrics.requests.labels(outcome="error").inc()
            await context.abort(grpc.StatusCode.INTERNAL, f"request {request.request_id} ended without a token")

        # Copied out now, while the finished request's blocks are surely still cached.
        exported = await server.engine.export_blocks(hashes)
        first = pb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=output.new_token_ids[0],
            num_cached_tokens=output.num_cached_tokens,
            finish_reason=self._finish_reason(output.finish_reason, params, len(prompt) + 1, server.engine.max_model_len),
        )
        if output.new_logprobs:
            first.logprob = output.new_logprobs[0]
        decoding_goes_on = first.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED
        if decoding_goes_on:  # the caller has its first token while the blocks go to the store
            yield first
        # No cached prefix: the engine and the stores it asked held none of these blocks.
        stored, put = await server.handoff.put_missing(exported, stores, ask_first=output.num_cached_tokens > 0)
        metrics.count_transfer("put", put)
        if len(stored) < len(hashes) and stores:
            log.warning("prompt blocks not all stored", extra={
                "request_id": request.request_id, "num_blocks": len(hashes), "num_stored": len(stored)})
        # Counted before the last message: a caller may hang up as soon as it has it.
        metrics.requests.labels(outcome="ok").inc()
        metrics.prompt_tokens.inc(len(prompt))
        metrics.cached_tokens.inc(output.num_cached_tokens)
        metrics.generated_tokens.inc(1)
        metrics.request_seconds.observe(time.perf_counter() - started)
        if decoding_goes_on:
            yield pb.PrefillResponse(request_id=request.request_id, block_hashes=stored)
        else:
            first.block_hashes.extend(stored)
            yield first

    @staticmethod
    def _finish_reason(reason: str | None, params, num_tokens: int, max_model_len: int) -> int:
        """The engine ran with max_tokens 1, so its "length" ends the request only when
        the caller's max_tokens or the context is used up as well."""
        if reason == "length" and params.max_tokens > 1 and num_tokens < max_model_len:
            return common_pb2.FINISH_REASON_UNSPECIFIED
        return FINISH_REASONS[reason]


class PrefillServer(WorkerServer):
    """A running prefill worker: ``await start()``, then ``await drain()`` (or a signal)."""

    service_name = SERVICE_NAME

    def add_servicer(self, server: grpc.aio.Server) -> None:
        self.servicer = PrefillServicer(self)
        pb_grpc.add_PrefillServicer_to_server(self.servicer, server)

    def load(self) -> dict[str, float]:
        return {**super().load(), "num_queued_prompt_tokens": self.servicer.num_queued_prompt_tokens}
