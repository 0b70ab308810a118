"""The pipeline and what its plugins see."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol, Sequence

from cleave.common.registry import InstanceRecord


@dataclass(slots=True)
class Candidate:
    """One worker that might serve the request, with the router's own view of its load."""

    record: InstanceRecord
    # Requests and prompt tokens this router has sent it and not yet seen back. The
    # worker's load report lags by up to its report interval; these do not.
    in_flight: int = 0
    in_flight_tokens: int = 0
    score: float = 0.0

    @property
    def instance_id(self) -> str:
        return self.record.instance_id

    def reported(self, key: str) -> float:
        value = self.record.load.get(key, 0)
        return float(value) if isinstance(value, (int, float)) else 0.0


@dataclass(slots=True)
class RoutingContext:
    """One routing decision: which role, for which tokens, avoiding whom."""

    role: str
    request_id: str
    token_ids: Sequence[int]
    # Workers that already failed this request.
    exclude: frozenset[str] = frozenset()
    # Decode must hash blocks as the prefill worker did: same model root and block size.
    root_hash: str | None = None
    # The store's KV index: block hash -> store instance id (None: not stored). Async,
    # and asked at most once per decision, by whichever plugin needs it first.
    lookup_stored: Callable[[Sequence[int]], Awaitable[list[str | None]]] | None = None
    _hashes: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    _stored: dict[tuple[str, int], list[str | None]] = field(default_factory=dict)

    def block_hashes(self, record: InstanceRecord) -> list[int]:
        """Chained hashes of the prompt's full blocks as ``record``'s worker computes them."""
        from cleave.engine.block_manager import hash_prefix_blocks

        key = (str(record.capabilities.get("root_hash", "0")), int(record.capabilities.get("block_size", 16)))
        if key not in self._hashes:
            self._hashes[key] = hash_prefix_blocks(list(self.token_ids), key[1], int(key[0]))
        return self._hashes[key]

    async def stored(self, record: InstanceRecord) -> list[str | None]:
        key = (str(record.capabilities.get("root_hash", "0")), int(record.capabilities.get("block_size", 16)))
        if key not in self._stored:
            hashes = self.block_hashes(record)
            self._stored[key] = await self.lookup_stored(hashes) if self.lookup_stored and hashes else []
        return self._stored[key]


class Filter(Protocol):
    name: str

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    name: str

    async def score(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[float]:
        """One score in [0, 1] per candidate, higher is better."""
        ...

    def observe(self, ctx: RoutingContext, chosen: Candidate) -> None: ...


class Picker(Protocol):
    name: str

    def pick(self, ctx: RoutingContext, candidates: list[Candidate]) -> Candidate: ...


class ExcludeFailed:
    """Never send a request back to a worker that already failed it."""

    name = "exclude-failed"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if c.instance_id not in ctx.exclude]


class SameBlockHashes:
    """Decode must agree with prefill on block hashes (same model fingerprint and block
    size), or it would refuse the hand-off."""

    name = "same-block-hashes"

    def filter(self, ctx: RoutingContext, candidates: list[Candidate]) -> list[Candidate]:
        if ctx.root_hash is None:
            return candidates
        return [c for c in candidates if str(c.record.capabilities.get("root_hash")) == ctx.root_hash]


FILTERS: tuple[Filter, ...] = (ExcludeFailed(), SameBlockHashes())


class Pipeline:
    """Filters, weighted scorers, a picker. ``choose`` returns None when no candidate is left."""

    def __init__(self, scorers: Sequence[tuple[Scorer, float]], picker: Picker, spec: str = "") -> None:
        self.filters = FILTERS
        self.scorers = list(scorers)
        self.picker = picker
        self.spec = spec

    async def choose(self, ctx: RoutingContext, candidates: list[Candidate]) -> Candidate | None:
        for f in self.filters:
            candidates = f.filter(ctx, candidates)
        if not candidates:
            return None
        for c in candidates:
            c.score = 0.0
        for scorer, weight in self.scorers:
            for c, s in zip(candidates, await scorer.score(ctx, candidates)):
                c.score += weight * s
        chosen = self.picker.pick(ctx, candidates)
        for scorer, _ in self.scorers:
            scorer.observe(ctx, chosen)
        return chosen

    def normalized_score(self, chosen: Candidate) -> float | None:
        """The chosen candidate's score over the scorers' total weight, in [0, 1]; None
        when the pipeline has no scorers (round-robin)."""
        total_weight = sum(weight for _, weight in self.scorers)
        return min(max(chosen.score / total_weight, 0.0), 1.0) if total_weight > 0 else None

    def describe(self) -> dict[str, Any]:
        return {
            "filters": [f.name for f in self.filters],
            "scorers": {s.name: w for s, w in self.scorers},
            "picker": self.picker.name,
        }


def parse_pipeline(spec: str, *, prefix_capacity: int = 100_000) -> Pipeline:
    """``"round-robin"``, or scorers with optional weights: ``"kv-aware=2,least-loaded"``."""
    from cleave.router.plugins.pickers import PICKERS
    from cleave.router.plugins.scorers import SCORERS

    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError("a routing pipeline needs at least one of: round-robin, " + ", ".join(sorted(SCORERS)))
    if "round-robin" in names:
        if len(names) > 1:
            raise ValueError(f"round-robin takes no scorers, got {spec!r}")
        return Pipeline([], PICKERS["round-robin"](), spec)
    scorers = []
    for part in names:
        name, _, weight_text = part.partition("=")
        name = name.strip()
        if name not in SCORERS:
            raise ValueError(f"unknown routing scorer {name!r}; known: round-robin, {', '.join(sorted(SCORERS))}")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"weight of {name} must be a number, got {weight_text!r}") from None
        if not (weight > 0 and math.isfinite(weight)):
            raise ValueError(f"weight of {name} must be > 0, got {weight_text!r}")
        scorers.append((SCORERS[name](prefix_capacity=prefix_capacity), weight))
    return Pipeline(scorers, PICKERS["best"](), spec)
