"""Pickers: take one candidate of those scored."""

from __future__ import annotations

import itertools

from cleave.router.plugins.base import Candidate, RoutingContext


class RoundRobin:
    """Each candidate in turn, ignoring scores (by instance id, so that a pool that
    changes between requests still rotates fairly)."""

    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, ctx: RoutingContext, candidates: list[Candidate]) -> Candidate:
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        return ordered[next(self._counter) % len(ordered)]


class Best(RoundRobin):
    """The highest score; ties go round-robin, so equal workers share the load."""

    name = "best"

    def pick(self, ctx: RoutingContext, candidates: list[Candidate]) -> Candidate:
        top = max(c.score for c in candidates)
        return super().pick(ctx, [c for c in candidates if c.score >= top - 1e-9])


PICKERS = {"round-robin": RoundRobin, "best": Best}
