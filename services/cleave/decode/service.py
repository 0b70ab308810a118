"""The ``cleave.v1.Decode`` service: continue a request from its tokens so far and the
KV blocks in the store, streaming what it generates."""

from __future__ import annotations

import logging
import time
from typing import AsyncIterator

import grpc

from cleave.common.kv_handoff import WorkerServer, abort_engine_error, abort_invalid, request_tokens
from cleave.common.wire import FINISH_REASONS, params_from_proto
from cleave.engine.async_engine import EngineDeadError, EngineStepError
from cleave.protogen.cleave.v1 import decode_pb2 as pb
from cleave.protogen.cleave.v1 import decode_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.decode")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decode"].full_name


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, server: "DecodeServer") -> None:
        self.server = server

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecodeResponse]:
        server = self.server
        metrics = server.metrics
        engine = server.engine.engine
        started = time.perf_counter()
        try:
            token_ids = request_tokens(request.request_id, request.token_ids,
                                       "send the prompt and the tokens generated so far")
            if request.num_generated < 1:
                raise ValueError("num_generated must be >= 1: decode continues a prefilled request")
            params = params_from_proto(request.params)
            engine.validate(token_ids, params, request.num_generated)
            hashes = engine.block_hashes(token_ids)
            given = list(request.block_hashes)
            if given != hashes[: len(given)]:
                raise ValueError(
                    "block_hashes do not match token_ids on this worker (another model, dtype or block size, "
                    "or tokens that are not the ones prefilled)"
                )
            stores = server.handoff.resolve(request.kvstore_targets)
        except ValueError as exc:
            await abort_invalid(metrics, context, exc)

        # Named blocks are known to be stored; without names the index is asked for all.
        wanted = hashes[: len(given)] if given else hashes
        fetched = await server.handoff.import_prefix(server.engine, wanted, token_ids, stores)
        if fetched is not None:
            metrics.count_transfer("fetched", fetched)

        metrics.prompt_tokens.inc(len(token_ids))
        outcome = "cancelled"
        first = True
        stream = server.engine.generate(request.request_id, token_ids, params, num_output_tokens=request.num_generated)
        try:
            async for output in stream:
                metrics.generated_tokens.inc(len(output.new_token_ids))
                if first:
                    metrics.cached_tokens.inc(output.num_cached_tokens)
                    first = False
                if output.finished:
                    outcome = "ok"  # the caller may close the call as soon as it has the last token
                yield pb.DecodeResponse(
                    request_id=request.request_id,
                    token_ids=output.new_token_ids,
                    logprobs=output.new_logprobs,
                    finish_reason=FINISH_REASONS[output.finish_reason] if output.finished else 0,
                )
            outcome = "ok"
        except ValueError as exc:
            outcome = "invalid"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (EngineDeadError, EngineStepError) as exc:
            outcome = "error"
            await abort_engine_error(context, exc)
        finally:
            # A client that goes away cancels this handler; closing the stream aborts
            # the engine request and frees its blocks.
            await stream.aclose()
            metrics.requests.labels(outcome=outcome).inc()
            metrics.request_seconds.observe(time.perf_counter() - started)


class DecodeServer(WorkerServer):
    """A running decode worker: ``await start()``, then ``await drain()`` (or a signal)."""

    service_name = SERVICE_NAME

    def add_servicer(self, server: grpc.aio.Server) -> None:
        self.servicer = DecodeServicer(self)
        pb_grpc.add_DecodeServicer_to_server(self.servicer, server)

    def load(self) -> dict[str, float]:
        return {**super().load(), "num_kv_blocks": self.engine.stats()["num_kv_blocks"]}
