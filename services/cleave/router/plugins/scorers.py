"""Scorers: each returns one score in [0, 1] per candidate, higher is better."""

from __future__ import annotations

from collections import OrderedDict

from cleave.router.plugins.base import Candidate, RoutingContext


def _queued_requests(c: Candidate) -> float:
    # The report counts this router's requests too, once they arrive; the router's own
    # count covers the report's lag. Taking the larger counts neither twice.
    return max(c.reported("num_running") + c.reported("num_waiting"), float(c.in_flight))


class LeastLoaded:
    """Fewer requests queued or running scores higher."""

    name = "least-loaded"

    def __init__(self, **_: object) -> None:
        pass

    async def score(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[float]:
        loads = [_queued_requests(c) for c in candidates]
        worst = max(loads)
        return [1.0 - load / worst if worst > 0 else 1.0 for load in loads]

    def observe(self, ctx: RoutingContext, chosen: Candidate) -> None:
        pass


class PrefixTracker:
    """What the router believes each worker holds in its prefix cache: the block hashes
    of the prompts it sent there, newest kept, at most ``capacity`` per worker (a worker
    evicts least recently used blocks too, so the guess errs the same way)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def matched(self, instance_id: str, hashes: list[int]) -> int:
        """Leading blocks of ``hashes`` the worker is believed to hold."""
        held = self._blocks.get(instance_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def add(self, instance_id: str, hashes: list[int]) -> None:
        held = self._blocks.setdefault(instance_id, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget_except(self, live: set[str]) -> None:
        for instance_id in list(self._blocks):
            if instance_id not in live:
                del self._blocks[instance_id]


class KVAware:
    """Cached prefix against queued work: the prompt tokens a worker would still have to
    compute, plus the prompt tokens already queued ahead on it, is its cost; the cheapest
    scores 1.

    A leading block the worker holds (as far as this router routed there) costs nothing;
    one the KV store holds (the Redis KV index) costs ``fetch_cost`` of computing it,
    since the worker fetches it instead; the rest costs its tokens in full."""

    name = "kv-aware"
    fetch_cost = 0.2

    def __init__(self, prefix_capacity: int = 100_000, **_: object) -> None:
        self.tracker = PrefixTracker(prefix_capacity)

    async def score(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[float]:
        costs = []
        for c in candidates:
            hashes = ctx.block_hashes(c.record)
            block_size = int(c.record.capabilities.get("block_size", 16))
            local = self.tracker.matched(c.instance_id, hashes)
            stored = await ctx.stored(c.record)
            in_store = 0
            for owner in stored[local:]:
                if owner is None:
                    break
                in_store += 1
            to_compute = len(ctx.token_ids) - (local + in_store) * block_size
            queued = max(c.reported("num_queued_prompt_tokens"), float(c.in_flight_tokens))
            costs.append(to_compute + self.fetch_cost * in_store * block_size + queued)
        worst = max(costs)
        return [1.0 - cost / worst if worst > 0 else 1.0 for cost in costs]

    def observe(self, ctx: RoutingContext, chosen: Candidate) -> None:
        self.tracker.add(chosen.instance_id, ctx.block_hashes(chosen.record))


SCORERS = {"least-loaded": LeastLoaded, "kv-aware": KVAware}
