"""The engine's side of the expert pool: an :class:`~cleave.models.moe.ExpertBackend`
whose experts live in expert replicas.

For one MoE layer the backend picks, for each expert the layer's tokens were routed to,
one replica holding it (as few replicas as it can), and sends each picked replica ONE
``RunExperts`` call with only the tokens routed to its share, all calls at once, over the
replica's stream (:mod:`cleave.expert.stream`) when it has one, else over gRPC. It
places the returned slots into one ``[T * k, H]`` tensor and sums them with
:func:`~cleave.models.moe.accumulate_slots`: each expert runs on exactly the rows it
would run on in process, so the result is bit for bit the local one.

A replica that fails with UNAVAILABLE or a deadline is set aside and its share sent to
another replica holding the same experts; when none is left,
:class:`ExpertUnavailableError` is raised. Every call carries a deadline, so a forward
pass never hangs on a replica.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import grpc
import redis
import torch
from prometheus_client import Histogram

from cleave.common.grpc_server import channel_options
from cleave.common.registry import Registry
from cleave.expert.spec import Pair, format_spec, parse_canonical
from cleave.expert.stream import StreamClient
from cleave.expert.wire import from_proto, to_proto
from cleave.models.moe import ExpertBackendError, accumulate_slots
from cleave.protogen.cleave.v1 import expert_pb2 as pb
from cleave.protogen.cleave.v1 import expert_pb2_grpc as pb_grpc

log = logging.getLogger("cleave.expert.client")

ROLE = "expert"

# Each replica as its callers see it (queueing, network and a stalled process included,
# which the replica's own cleave_expert_request_seconds cannot see); the prefill and
# decode workers serve it (WorkerMetrics).
CALL_SECONDS = Histogram(
    "cleave_expert_client_call_seconds", "RunExperts call duration seen by the caller, by expert replica",
    ["replica"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Codes after which another replica may well succeed; anything else (INVALID_ARGUMENT,
# INTERNAL...) is a bug that retrying elsewhere would only repeat.
RETRYABLE = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED,
})


class ExpertUnavailableError(ExpertBackendError):
    """No reachable replica holds an expert that tokens were routed to."""


class ExpertCallError(ExpertBackendError):
    """A replica refused a call or answered with something other than what was asked."""


@dataclass(frozen=True, slots=True)
class Replica:
    """One expert replica: where to dial it and the (layer, expert) pairs it holds.
    ``stream_address``: its RunExperts stream (cleave.expert.stream), used instead of
    gRPC when set."""

    address: str
    experts: frozenset[Pair]
    instance_id: str = ""
    stream_address: str = ""


def model_name(path: str | Path) -> str:
    """The name replicas register their model under, and callers match: its folder's name."""
    return Path(path).name


def replicas_from_registry(registry: Registry, model: str = "") -> list[Replica]:
    """The live expert replicas in the registry (of ``model``, if given)."""
    replicas = []
    for record in registry.list_instances(ROLE):
        if model and record.capabilities.get("model") != model:
            continue
        try:
            experts = parse_canonical(str(record.capabilities.get("experts", "")))
        except ValueError as exc:
            log.warning("skipping expert replica with a bad experts capability",
                        extra={"instance_id": record.instance_id, "error": str(exc)})
            continue
        if experts:
            stream = str(record.capabilities.get("stream_address") or "")
            replicas.append(Replica(record.address, experts, record.instance_id, stream))
    return replicas


class RemoteExpertBackend:
    """:class:`~cleave.models.moe.ExpertBackend` over expert replicas.

    ``replicas`` is a static list; with ``registry`` the list is read from Redis too,
    every ``refresh_seconds`` and after a failure. ``timeout`` bounds each call; a failed
    replica is avoided for ``down_seconds`` (then tried again, since it may be back).
    """

    def __init__(
        self,
        replicas: Sequence[Replica] = (),
        *,
        registry: Registry | None = None,
        model: str = "",
        timeout: float = 10.0,
        refresh_seconds: float = 5.0,
        down_seconds: float = 5.0,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        self.static = list(replicas)
        self.registry = registry
        self.model = model
        self.timeout = timeout
        self.refresh_seconds = refresh_seconds
        self.down_seconds = down_seconds
        self.replicas: list[Replica] = list(self.static)
        self._next_refresh = 0.0
        self._down_until: dict[str, float] = {}
        self._stubs: dict[str, tuple[grpc.Channel, pb_grpc.ExpertStub]] = {}
        # By gRPC address: the replica's stream, None for one without (gRPC it is).
        self._streams: dict[str, StreamClient | None] = {}
        # CALL_SECONDS child per address, looked up once rather than on every call.
        self._call_seconds: dict[str, Any] = {}
        self._pool: ThreadPoolExecutor | None = None  # the calls beside the last, when a layer needs several
        self.num_forwards = 0
        self.num_calls = 0
        self.num_failovers = 0
        if registry is not None:
            self.refresh()

    @classmethod
    def from_registry(cls, redis_url: str, **kwargs) -> "RemoteExpertBackend":
        return cls(registry=Registry.from_url(redis_url), **kwargs)

    def refresh(self) -> None:
        """Re-read the replica list from the registry (a Redis error keeps the old one)."""
        if self.registry is None:
            return
        self._next_refresh = time.monotonic() + self.refresh_seconds
        try:
            found = replicas_from_registry(self.registry, self.model)
        except redis.RedisError as exc:
            log.warning("expert registry refresh failed", extra={"error": str(exc)})
            return
        addresses = {replica.address for replica in self.static}
        self.replicas = self.static + [replica for replica in found if replica.address not in addresses]
        self._call_seconds.clear()  # an address may now name another instance
        streams = {replica.address: replica.stream_address for replica in self.replicas}
        for address, stream in list(self._streams.items()):
            if streams.get(address) != (stream.address if stream else ""):
                if stream is not None:
                    stream.close()
                del self._streams[address]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        for channel, _ in self._stubs.values():
            channel.close()
        self._stubs.clear()
        for stream in self._streams.values():
            if stream is not None:
                stream.close()
        self._streams.clear()
        if self.registry is not None:
            self.registry.client.close()

    def forward(
        self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = topk_ids.shape
        if num_tokens == 0:
            return hidden.new_zeros(hidden.shape)
        self.num_forwards += 1
        if self.registry is not None and time.monotonic() >= self._next_refresh:
            self.refresh()
        device = hidden.device
        hidden, topk_ids = hidden.detach().cpu(), topk_ids.cpu()
        topk_weights = topk_weights.detach().cpu().float()
        slots = torch.zeros(num_tokens * top_k, hidden.shape[-1], dtype=hidden.dtype)
        hit = set(topk_ids.flatten().tolist())
        pending = set(hit)
        failed: dict[str, str] = {}
        refreshed = False
        while pending:
            try:
                plan = self._plan(layer, pending, failed)
            except ExpertUnavailableError:
                if refreshed or self.registry is None:
                    raise
                self.refresh()
                refreshed = True
                continue
            shares = [(address, experts, *self._request(layer, experts, hidden, topk_ids, topk_weights,
                                                        whole=hit <= set(experts)))
                      for address, experts in plan.items()]
            futures = self._send_all([(address, request) for address, _, _, request in shares])
            for (address, experts, rows, _), future in zip(shares, futures):
                try:
                    response = future.result()
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE:
                        raise ExpertCallError(
                            f"expert replica {address} refused layer {layer} experts {experts}: "
                            f"{exc.code().name}: {exc.details()}"
                        ) from None
                    failed[address] = f"{exc.code().name}: {exc.details()}"
                    self._down_until[address] = time.monotonic() + self.down_seconds
                    self.num_failovers += 1
                    log.warning("expert replica failed; retrying its share elsewhere",
                                extra={"address": address, "layer": layer, "error": failed[address]})
                    continue
                self._place(slots, response, address, layer, experts, rows, topk_ids)
                pending -= set(experts)
            if pending and not refreshed and self.registry is not None:
                self.refresh()
                refreshed = True
        return accumulate_slots(slots, topk_ids).to(device)

    def _plan(self, layer: int, needed: set[int], failed: dict[str, str]) -> dict[str, list[int]]:
        """Replica address -> the experts it runs: replicas up now first, then those set
        aside earlier (they may be back), never one that failed in this forward pass; a
        greedy cover, so that the layer takes as few calls as it can."""
        now = time.monotonic()
        usable = [r for r in self.replicas if r.address not in failed]
        tiers = [[r for r in usable if self._down_until.get(r.address, 0.0) <= now],
                 [r for r in usable if self._down_until.get(r.address, 0.0) > now]]
        plan: dict[str, list[int]] = {}
        left = set(needed)
        for tier in tiers:
            while left:
                best, cover = None, set()
                for replica in tier:
                    if replica.address in plan:
                        continue
                    held = {e for e in left if (layer, e) in replica.experts}
                    if len(held) > len(cover):
                        best, cover = replica, held
                if best is None:
                    break
                plan[best.address] = sorted(cover)
                left -= cover
        if left:
            missing = format_spec((layer, e) for e in sorted(left))
            known = ", ".join(f"{r.address} [{format_spec(r.experts)}]" for r in self.replicas) or "none"
            failures = "; ".join(f"{a}: {m}" for a, m in failed.items())
            raise ExpertUnavailableError(
                f"no reachable expert replica holds {missing} (layer:expert); replicas known: {known}"
                + (f"; failed in this call: {failures}" if failures else "")
            )
        return plan

    def _stub(self, address: str) -> pb_grpc.ExpertStub:
        if address not in self._stubs:
            channel = grpc.insecure_channel(address, options=channel_options())
            self._stubs[address] = (channel, pb_grpc.ExpertStub(channel))
        return self._stubs[address][1]

    @staticmethod
    def _request(layer: int, experts: list[int], hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor | None, pb.RunExpertsRequest]:
        """The rows routed to ``experts`` (None: ``whole``, every token, because ``experts``
        covers every expert hit, as when a replica holds whole layers) and the call that
        sends them."""
        rows = None if whole else torch.isin(topk_ids, torch.tensor(experts)).any(dim=1).nonzero().flatten()
        if rows is not None:
            hidden, topk_ids, topk_weights = hidden[rows], topk_ids[rows], topk_weights[rows]
        request = pb.RunExpertsRequest(
            layer=layer, hidden_states=to_proto(hidden), topk_ids=to_proto(topk_ids),
            topk_weights=to_proto(topk_weights), expert_ids=experts,
        )
        return rows, request

    def _send_all(self, calls: list[tuple[str, pb.RunExpertsRequest]]) -> list[Future]:
        """Run the calls at once: all but the last on the call threads, the last on this
        one. Blocking calls, not ``.future()``: a sync channel starts a polling thread
        whenever its count of future calls rises from zero, which here was once per MoE
        layer per step, and cost more CPU than the call itself."""
        self.num_calls += len(calls)
        if len(calls) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="expert-call")
        futures = [self._pool.submit(self._call, address, request) for address, request in calls[:-1]]
        last: Future = Future()
        try:
            last.set_result(self._call(*calls[-1]))
        except grpc.RpcError as exc:
            last.set_exception(exc)
        return futures + [last]

    def _call(self, address: str, request: pb.RunExpertsRequest) -> pb.RunExpertsResponse:
        seconds = self._call_seconds.get(address)
        if seconds is None:
            replica = next((r.instance_id for r in self.replicas if r.address == address and r.instance_id), address)
            seconds = self._call_seconds[address] = CALL_SECONDS.labels(replica)
        if address in self._streams:
            stream = self._streams[address]
        else:
            target = next((r.stream_address for r in self.replicas if r.address == address), "")
            stream = self._streams[address] = StreamClient(target) if target else None
        sent = time.perf_counter()
        try:
            if stream is not None:
                return stream.call(request, self.timeout)
            return self._stub(address).RunExperts(request, timeout=self.timeout)
        finally:
            seconds.observe(time.perf_counter() - sent)

    @staticmethod
    def _place(slots: torch.Tensor, response: pb.RunExpertsResponse, address: str, layer: int, experts: list[int],
               rows: torch.Tensor | None, topk_ids: torch.Tensor) -> None:
        top_k = topk_ids.shape[1]
        outputs = from_proto(response.slot_outputs, "slot_outputs")
        answered = list(response.slot_indices)
        if rows is None:  # every token sent, every slot's expert in the share: all slots, in order
            expected_count = len(slots)
            placed = answered == list(range(expected_count))
        else:
            sent_ids = topk_ids[rows].flatten()
            expected = torch.isin(sent_ids, torch.tensor(experts)).nonzero().flatten()
            local = torch.tensor(answered, dtype=torch.int64)
            expected_count = len(expected)
            placed = torch.equal(local, expected)
        if not placed or outputs.shape != (expected_count, slots.shape[1]) or outputs.dtype != slots.dtype:
            raise ExpertCallError(
                f"expert replica {address} answered layer {layer} experts {experts} with slots "
                f"{answered[:8]}... of shape {list(outputs.shape)} {outputs.dtype}; "
                f"expected {expected_count} slots of [{slots.shape[1]}] {slots.dtype}"
            )
        if rows is None:
            slots.copy_(outputs)
        else:
            slots[rows[local // top_k] * top_k + local % top_k] = outputs
