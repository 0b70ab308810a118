"""Which (layer, expert) pairs a replica holds, written as a short spec.

A spec is a comma-separated list of items. ``E`` or ``E1-E2`` names experts of every
MoE layer; ``L:E``, ``L:E1-E2`` and ``L1-L2:E1-E2`` name experts of some layers;
``all`` (or ``*``) is every expert of every MoE layer. ``"0-3"``, ``"0,2"``,
``"0:0-3,1:4-7"`` are specs. :func:`format_spec` writes the canonical form
(``"0-1:0-3"``, ``"0:0-3,1:4-7"``), which replicas publish in the registry.
"""

from __future__ import annotations

from collections.abc import Iterable

Pair = tuple[int, int]


def _parse_range(text: str, what: str) -> range:
    first, sep, last = text.strip().partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: expected N or N-M") from None
    if lo < 0 or hi < lo:
        raise ValueError(f"bad {what} range {text!r}")
    return range(lo, hi + 1)


def parse_spec(spec: str, moe_layers: Iterable[int], num_experts: int) -> frozenset[Pair]:
    """The (layer, expert) pairs of ``spec``; raises ValueError naming the bad item,
    a layer that is not an MoE layer or an expert id out of range."""
    layers = sorted(moe_layers)
    pairs: set[Pair] = set()
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ValueError("experts spec is empty")
    for item in items:
        if item in ("all", "*"):
            pairs.update((layer, e) for layer in layers for e in range(num_experts))
            continue
        layer_text, sep, expert_text = item.rpartition(":")
        item_layers = _parse_range(layer_text, "layer") if sep else layers
        for layer in item_layers:
            if layer not in layers:
                raise ValueError(f"experts spec item {item!r}: layer {layer} is not an MoE layer (MoE layers: {layers})")
            for expert in _parse_range(expert_text, "expert"):
                if expert >= num_experts:
                    raise ValueError(f"experts spec item {item!r}: expert {expert} >= num_experts {num_experts}")
                pairs.add((layer, expert))
    return frozenset(pairs)


def _runs(numbers: list[int]) -> list[str]:
    """Sorted numbers as ``N`` / ``N-M`` runs."""
    runs: list[str] = []
    start = prev = numbers[0]
    for number in [*numbers[1:], None]:
        if number is not None and number == prev + 1:
            prev = number
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if number is not None:
            start = prev = number
    return runs


def format_spec(pairs: Iterable[Pair]) -> str:
    """The canonical spec of ``pairs``: one ``L:E1-E2`` item per run of experts, and one
    ``L1-L2:E1-E2`` for consecutive layers holding the same experts."""
    by_layer: dict[int, list[int]] = {}
    for layer, expert in sorted(set(pairs)):
        by_layer.setdefault(layer, []).append(expert)
    # Consecutive layers with the same expert runs share their items.
    groups: list[tuple[list[int], list[str]]] = []
    for layer, experts in by_layer.items():
        runs = _runs(experts)
        if groups and groups[-1][1] == runs and groups[-1][0][-1] == layer - 1:
            groups[-1][0].append(layer)
        else:
            groups.append(([layer], runs))
    return ",".join(f"{_runs(layers)[0]}:{run}" for layers, runs in groups for run in runs)


def parse_canonical(spec: str) -> frozenset[Pair]:
    """Read a spec that names its layers in every item (what :func:`format_spec` writes),
    without knowing the model."""
    pairs: set[Pair] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        layer_text, sep, expert_text = item.rpartition(":")
        if not sep:
            raise ValueError(f"experts item {item!r} names no layer")
        for layer in _parse_range(layer_text, "layer"):
            pairs.update((layer, e) for e in _parse_range(expert_text, "expert"))
    return frozenset(pairs)
