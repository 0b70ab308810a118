"""The expert replica's gRPC service (``cleave.v1.Expert``) and the process around it:
held weights, registry record, metrics port and graceful drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import grpc
import torch

from cleave.common.grpc_server import ServiceServer
from cleave.common.registry import AsyncRegistration, AsyncRegistry, InstanceRecord
from cleave.expert.client import model_name
from cleave.expert.config import ExpertConfig
from cleave.expert.metrics import ExpertMetrics
from cleave.expert.spec import format_spec, parse_spec
from cleave.expert.stream import InvalidRequest, StreamServer
from cleave.expert.weights import HeldExperts, load_experts
from cleave.expert.wire import WireError, from_proto, to_proto
from cleave.models.config import ModelConfig
from cleave.models.moe import expert_slot_outputs
from cleave.protogen.cleave.v1 import expert_pb2 as pb
from cleave.protogen.cleave.v1 import expert_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.expert")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Expert"].full_name
ROLE = "expert"
# Calls of at most this many tokens run on the event loop itself (ExpertServicer.run):
# with several torch threads, the larger ones go to a worker thread so that two can run at
# once and health checks are answered meanwhile. With one torch thread a worker thread
# buys no parallelism, only GIL hand-offs with the loop answering decode's small calls,
# up to a prompt's few hundred tokens; the chunks of a burst (up to the prefill step's
# 1024) still go to the thread, so decode's calls are answered while one computes
# (docs/benchmarks.md, run I: 256 served more than 64 and than 1024).
INLINE_MAX_TOKENS = 64
ONE_THREAD_INLINE_MAX_TOKENS = 256


def inline_max_tokens(configured: int, num_threads: int) -> int:
    """The largest call run on the event loop: ``configured``, or for -1 the default for
    ``num_threads`` torch threads."""
    if configured >= 0:
        return configured
    return ONE_THREAD_INLINE_MAX_TOKENS if num_threads == 1 else INLINE_MAX_TOKENS


def _check_request(request: pb.RunExpertsRequest,
                   experts: HeldExperts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, set[int], list[int]]:
    """The call's tensors, the experts to run and the flat expert id of every slot."""
    config: ModelConfig = experts.config
    layer = request.layer
    if layer not in config.moe_layers:
        raise InvalidRequest(f"layer {layer} is not an MoE layer of this model (MoE layers: {sorted(config.moe_layers)})")
    try:
        hidden = from_proto(request.hidden_states, "hidden_states")
        ids = from_proto(request.topk_ids, "topk_ids")
        weights = from_proto(request.topk_weights, "topk_weights")
    except WireError as exc:
        raise InvalidRequest(str(exc)) from None
    if hidden.dim() != 2 or hidden.shape[1] != config.hidden_size:
        raise InvalidRequest(f"hidden_states must be [num_tokens, {config.hidden_size}], got {list(hidden.shape)}")
    if hidden.dtype != experts.dtype:
        raise InvalidRequest(f"hidden_states must be {experts.dtype} (this replica's dtype), got {hidden.dtype}")
    if ids.dtype != torch.int64:
        raise InvalidRequest(f"topk_ids must be int64, got {ids.dtype}")
    if weights.dtype != torch.float32:
        raise InvalidRequest(f"topk_weights must be float32, got {weights.dtype}")
    num_tokens = hidden.shape[0]
    if ids.dim() != 2 or ids.shape[0] != num_tokens or ids.shape[1] < 1:
        raise InvalidRequest(f"topk_ids must be [{num_tokens}, top_k] with top_k >= 1, got {list(ids.shape)}")
    if weights.shape != ids.shape:
        raise InvalidRequest(f"topk_weights must have topk_ids' shape {list(ids.shape)}, got {list(weights.shape)}")
    flat = ids.flatten().tolist()
    if flat and (min(flat) < 0 or max(flat) >= config.num_experts):
        raise InvalidRequest(f"topk_ids must be in [0, {config.num_experts}), got [{min(flat)}, {max(flat)}]")
    held = experts.held(layer)
    if request.expert_ids:
        wanted = set(request.expert_ids)
        missing = sorted(wanted - held)
        if missing:
            raise InvalidRequest(f"experts {missing} of layer {layer} are not held here (held: {format_spec((layer, e) for e in sorted(held)) or 'none'})")
        held = wanted
    return hidden, ids, weights, held, flat


def run_experts(experts: HeldExperts, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                held: set[int], flat: list[int]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Slot outputs of the ``held`` experts: (rows, flat slot indices, experts that ran).
    ``flat``: the expert id of every slot (``ids`` flattened, as a list)."""
    routed = set(flat)
    hit = sorted(held & routed)
    if not hit:
        return hidden.new_zeros(0, hidden.shape[1]), [], []
    with torch.inference_mode():
        slots = expert_slot_outputs(
            experts.runner(layer), experts.config.num_experts, hidden, ids, weights, held=set(hit)
        )
    if len(hit) == len(routed):  # every slot ran here (a replica of whole layers): no selection
        return slots, list(range(len(flat))), hit
    ran = set(hit)
    indices = [i for i, expert in enumerate(flat) if expert in ran]
    return slots[torch.tensor(indices)], indices, hit


class ExpertServicer(pb_grpc.ExpertServicer):
    def __init__(self, experts: HeldExperts, metrics: ExpertMetrics, inline_max_tokens: int = INLINE_MAX_TOKENS) -> None:
        self.experts = experts
        self.metrics = metrics
        self.inline_max_tokens = inline_max_tokens
        # The registry record's load, published with each heartbeat (not per call: a
        # forward pass makes one call per MoE layer).
        self.load = {"num_in_flight": 0, "num_calls": 0, "num_tokens": 0}
        # Metric children of the held pairs, made once rather than looked up on every call.
        self._tokens = {(layer, e): metrics.tokens.labels(layer=str(layer), expert=str(e)) for layer, e in experts.pairs}
        self._layer_seconds = {layer: metrics.layer_seconds.labels(layer=str(layer)) for layer, _ in experts.pairs}

    async def RunExperts(self, request: pb.RunExpertsRequest, context: grpc.aio.ServicerContext) -> pb.RunExpertsResponse:
        try:
            return await self.run(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def run(self, request: pb.RunExpertsRequest) -> pb.RunExpertsResponse:
        """One call, over gRPC or the stream; raises :class:`InvalidRequest` for a bad one."""
        started = time.perf_counter()
        try:
            hidden, ids, weights, held, flat = _check_request(request, self.experts)
        except InvalidRequest:
            self.metrics.rejected.labels(code=grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            raise
        self.load["num_in_flight"] += 1
        try:
            if hidden.shape[0] <= self.inline_max_tokens:
                # A decode step's share takes well under a millisecond here; the hop to a
                # worker thread and back (a self-pipe write to wake the loop) cost more.
                rows, indices, ran = run_experts(self.experts, request.layer, hidden, ids, weights, held, flat)
            else:
                # Off the event loop, so health checks and other calls are answered meanwhile
                # and two large calls can run at once.
                rows, indices, ran = await asyncio.to_thread(
                    run_experts, self.experts, request.layer, hidden, ids, weights, held, flat)
        finally:
            self.load["num_in_flight"] -= 1
        self.load["num_calls"] += 1
        self.load["num_tokens"] += hidden.shape[0]
        layer = request.layer
        if ran:
            counts = Counter(flat)
            for expert in ran:  # held, so made above
                self._tokens[layer, expert].inc(counts[expert])
        elapsed = time.perf_counter() - started
        self.metrics.request_seconds.observe(elapsed)
        # A call may name an MoE layer this replica holds nothing of (and run nothing).
        (self._layer_seconds.get(layer) or self.metrics.layer_seconds.labels(layer=str(layer))).observe(elapsed)
        return pb.RunExpertsResponse(slot_outputs=to_proto(rows), slot_indices=indices, expert_ids=ran)


class ExpertServer:
    """A running replica: ``await start()``, then ``await drain()`` (or a signal)."""

    def __init__(self, config: ExpertConfig, experts: HeldExperts | None = None) -> None:
        self.config = config
        if experts is None:
            model_config = ModelConfig.from_pretrained(config.model)
            if not model_config.is_moe:
                raise ValueError(f"{config.model} is not a Mixture-of-Experts model")
            pairs = parse_spec(config.experts, model_config.moe_layers, model_config.num_experts)
            experts = load_experts(config.model, pairs, config.dtype)
        self.experts = experts
        self.metrics = ExpertMetrics(config.instance_id, len(experts.pairs))
        self.registration: AsyncRegistration | None = None
        self.grpc: ServiceServer | None = None  # made in start(): grpc.aio binds to the running loop
        self.stream: StreamServer | None = None
        self.metrics_port: int | None = None

    @property
    def address(self) -> str:
        """``host:port`` of the gRPC server, once started."""
        assert self.grpc is not None, "start() first"
        return self.grpc.address

    @property
    def stream_address(self) -> str:
        """``host:port`` of the RunExperts stream (cleave.expert.stream), once started;
        empty when it is off. Its host is the one advertised for gRPC."""
        if self.stream is None:
            return ""
        host = self.address.rpartition(":")[0]
        return f"{host}:{self.stream.port}"

    def capabilities(self) -> dict[str, object]:
        """The registry record's capabilities; ``experts`` is the canonical spec that
        :class:`cleave.expert.client.RemoteExpertBackend` reads."""
        model = self.experts.config
        return {
            "experts": format_spec(self.experts.pairs),
            "model": model_name(self.config.model),
            "family": model.family,
            "num_experts": model.num_experts,
            "dtype": self.config.dtype,
            "metrics_port": self.metrics_port,
            "stream_address": self.stream_address,
        }

    async def start(self) -> None:
        """Bind, serve, then register."""
        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.grpc = ServiceServer(
            config.host, config.port, [SERVICE_NAME], drain_grace=config.drain_grace_seconds,
            advertise=config.advertise_address,
        )
        servicer = ExpertServicer(self.experts, self.metrics,
                                  inline_max_tokens(config.inline_max_tokens, torch.get_num_threads()))
        pb_grpc.add_ExpertServicer_to_server(servicer, self.grpc.server)
        if config.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        if config.stream_port >= 0:
            self.stream = StreamServer(servicer.run, config.host, config.stream_port)
            await self.stream.start()
            self.grpc.after_stop(self.stream.close)
        await self.grpc.start()
        if config.redis_url:
            record = InstanceRecord(ROLE, config.instance_id, self.grpc.address, capabilities=self.capabilities(),
                                    load=servicer.load)
            registry = AsyncRegistry.from_url(config.redis_url)
            self.registration = await self.grpc.register(registry, record, config.registry_ttl_seconds)
            self.grpc.after_stop(registry.close)
        self.grpc.after_stop(self._close)
        log.info(
            "expert replica ready",
            extra={"address": self.grpc.address, "stream_address": self.stream_address, "metrics_port": self.metrics_port,
                   "experts": format_spec(self.experts.pairs), "instance_id": config.instance_id},
        )

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, deregister, finish in-flight calls, stop."""
        assert self.grpc is not None, "start() first"
        await self.grpc.drain(grace)

    async def _close(self) -> None:
        self.metrics.close()
