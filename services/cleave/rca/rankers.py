"""Rankers: from a metric table and an anomaly time to a ranked list of components.

Every ranker splits the table at the anomaly time ``t`` into a normal window (rows before
``t``, plus an optional reference table of normal data, aligned by series name) and an
anomalous window (rows from ``t``), scores each series and ranks components.

* ``baro`` (BARO, RCAEval): ``z = (x_after - median_before) / IQR_before`` (a zero IQR
  counts as 1, as scikit-learn's RobustScaler does); a series scores its largest ``|z|``; a
  component scores its best series.
* ``nsigma``: the same with mean and standard deviation.
* ``ours``: see :func:`ours`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from cleave.rca.timeseries import Graph, MetricTable


@dataclass(slots=True)
class SeriesEvidence:
    name: str
    metric: str
    score: float
    deviation: float
    onset: float | None


@dataclass(slots=True)
class ComponentScore:
    component: str
    score: float
    evidence: list[SeriesEvidence] = field(default_factory=list)


def split_windows(table: MetricTable, anomaly_time: float,
                  reference: MetricTable | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(before, after, after_time)``: normal rows, anomalous rows and their times."""
    is_after = table.time >= anomaly_time
    before = table.values[~is_after]
    if reference is not None:
        index = {n: j for j, n in enumerate(reference.names)}
        aligned = np.full((len(reference.time), table.num_series), np.nan)
        for j, name in enumerate(table.names):
            if name in index:
                aligned[:, j] = reference.values[:, index[name]]
        before = np.vstack([aligned, before])
    return before, table.values[is_after], table.time[is_after]


def _scaled(before: np.ndarray, after: np.ndarray, kind: str) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        if kind == "robust":
            center = np.nanmedian(before, axis=0)
            scale = np.nanpercentile(before, 75, axis=0) - np.nanpercentile(before, 25, axis=0)
        else:
            center = np.nanmean(before, axis=0)
            scale = np.nanstd(before, axis=0)
        scale = np.where((scale > 0) & np.isfinite(scale), scale, 1.0)
        return (after - center) / scale


def _peak(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per series: the largest |z| (0 if none) and the signed value there."""
    absz = np.where(np.isnan(z), -1.0, np.abs(z))
    if len(z) == 0:
        return np.zeros(z.shape[1]), np.zeros(z.shape[1])
    at = np.argmax(absz, axis=0)
    signed = z[at, np.arange(z.shape[1])]
    signed = np.where(np.isnan(signed), 0.0, signed)
    return np.abs(signed), signed


def _onsets(z: np.ndarray, after_time: np.ndarray, threshold: float) -> list[float | None]:
    hits = np.where(np.isnan(z), False, np.abs(z) >= threshold)
    return [float(after_time[np.argmax(hits[:, j])]) if hits[:, j].any() else None
            for j in range(z.shape[1])]


def _by_component(table: MetricTable, score: np.ndarray, signed: np.ndarray,
                  onsets: list[float | None], top_evidence: int = 3) -> list[ComponentScore]:
    groups: dict[str, list[SeriesEvidence]] = {}
    for j, name in enumerate(table.names):
        groups.setdefault(table.components[j], []).append(SeriesEvidence(
            name, table.metrics[j], float(score[j]), float(signed[j]), onsets[j]))
    ranked = []
    for component, evidence in groups.items():
        evidence.sort(key=lambda e: -e.score)
        ranked.append(ComponentScore(component, evidence[0].score, evidence[:top_evidence]))
    ranked.sort(key=lambda c: (-c.score, c.component))
    return ranked


def _baseline(kind: str, table: MetricTable, anomaly_time: float,
              reference: MetricTable | None) -> list[ComponentScore]:
    before, after, after_time = split_windows(table, anomaly_time, reference)
    z = _scaled(before, after, kind)
    score, signed = _peak(z)
    return _by_component(table, score, signed, _onsets(z, after_time, 3.0))


def baro(table: MetricTable, anomaly_time: float, graph: Graph | None = None,
         reference: MetricTable | None = None) -> list[ComponentScore]:
    return _baseline("robust", table, anomaly_time, reference)


def nsigma(table: MetricTable, anomaly_time: float, graph: Graph | None = None,
           reference: MetricTable | None = None) -> list[ComponentScore]:
    return _baseline("normal", table, anomaly_time, reference)


LATENCY = re.compile(r"latency|duration|ttft|tpot|p\d\d", re.I)
# ``up`` (Prometheus reached the target) is availability: a drop from 1 is a failure, not traffic.
ERRORS = re.compile(r"error|fail|success|availab|exception|5xx|^up$", re.I)
RESOURCE = re.compile(r"cpu|mem|gpu|disk|syscall|thread|gc|kv|cache|queue", re.I)
# Whether the process itself answers (its scrape succeeds, and how fast): a slow or dead
# callee cannot stop a caller's own process, so no callee explains these away.
LIVENESS = re.compile(r"^up$|^scrape_duration", re.I)


def metric_kind(metric: str) -> str:
    """``latency``, ``errors``, ``resource`` or ``traffic`` from the metric's name."""
    if ERRORS.search(metric):
        return "errors"
    if LATENCY.search(metric):
        return "latency"
    if RESOURCE.search(metric):
        return "resource"
    return "traffic"


@dataclass(slots=True)
class OursConfig:
    """Knobs of :func:`ours`, set once on principles (see docs/rca.md), not per case."""

    relative_floor: float = 0.05      # the scale is at least this share of |median_before|
    use_std: bool = True              # the scale is at least the standard deviation too
    onset_threshold: float = 3.0      # |z| from which a series counts as anomalous
    saturation: float = 50.0          # z is squashed as s * tanh(z / s): a huge z is no surer
    weights: dict[str, float] = field(default_factory=lambda: {
        "latency": 1.0, "errors": 1.0, "resource": 1.0, "traffic": 0.2})
    propagation_discount: float = 0.3  # share of a caller's latency kept when a callee explains it
    precedence_bonus: float = 0.1      # per step earlier than the first onset elsewhere


def _robust_z(before: np.ndarray, after: np.ndarray, relative_floor: np.ndarray | float,
              use_std: bool = True) -> np.ndarray:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(before, axis=0)
        iqr = np.nanpercentile(before, 75, axis=0) - np.nanpercentile(before, 25, axis=0)
        floor = relative_floor * np.abs(center)
        scale = np.fmax(np.fmax(iqr, floor), 1e-9)
        if use_std:
            scale = np.fmax(scale, np.nanstd(before, axis=0))
        z = (after - center) / scale
    return np.where(np.isfinite(z), z, np.nan)


def _downstream(graph: Graph, start: str) -> set[str]:
    seen, stack = set(), list(graph.get(start, ()))
    while stack:
        node = stack.pop()
        if node not in seen and node != start:
            seen.add(node)
            stack.extend(graph.get(node, ()))
    return seen


def ours(table: MetricTable, anomaly_time: float, graph: Graph | None = None,
         reference: MetricTable | None = None, config: OursConfig | None = None) -> list[ComponentScore]:
    """Our ranker. Per series ``z = (x_after - median_before) / scale`` with
    ``scale = max(IQR, std, relative_floor * |median|)`` (no relative floor for error and
    availability series, where a small change of a value near 100 is large), squashed to
    ``saturation``; series weighted by metric kind (:func:`metric_kind`). Then two
    corrections: a component whose latency/error anomaly dominates and is matched by a
    callee's (anywhere downstream in ``graph``) keeps only ``propagation_discount`` of it
    (its liveness series, :data:`LIVENESS`, are its own and never discounted), and
    components whose anomalies start earlier than all others get a precedence bonus."""
    cfg = config or OursConfig()
    before, after, after_time = split_windows(table, anomaly_time, reference)
    kinds = [metric_kind(m) for m in table.metrics]
    floors = np.array([0.0 if k == "errors" else cfg.relative_floor for k in kinds])
    z = _robust_z(before, after, floors, cfg.use_std)
    z = cfg.saturation * np.tanh(z / cfg.saturation)
    score, signed = _peak(z)
    onsets = _onsets(z, after_time, cfg.onset_threshold)
    weighted = score * np.array([cfg.weights[k] for k in kinds])
    ranked = _by_component(table, weighted, signed, onsets)
    by_name = {c.component: c for c in ranked}

    # A symptom a callee may explain (latency, errors) or the component's own evidence.
    is_symptom = [k in ("latency", "errors") and not LIVENESS.search(m) for k, m in zip(kinds, table.metrics)]

    def group_score(component: str, symptom: bool) -> float:
        return max((weighted[j] for j, c in enumerate(table.components)
                    if c == component and is_symptom[j] == symptom), default=0.0)

    adjusted = {}
    for comp in ranked:
        total = comp.score
        if graph:
            symptom = group_score(comp.component, True)
            local = group_score(comp.component, False)
            below = _downstream(graph, comp.component) & by_name.keys()
            explained = max((by_name[d].score for d in below), default=0.0)
            if symptom > local and explained >= cfg.onset_threshold and explained >= 0.5 * symptom:
                total = max(local, cfg.propagation_discount * symptom)
        adjusted[comp.component] = total
    first = [min((e.onset for e in c.evidence if e.onset is not None), default=None) for c in ranked]
    starts = sorted(t for t in first if t is not None)
    if len(starts) > 1 and len(after_time) > 1:
        step = float(np.median(np.diff(after_time)))
        for comp, start in zip(ranked, first):
            if start is not None and step > 0:
                lead = max(0.0, (starts[1] if start == starts[0] else starts[0]) - start) / step
                adjusted[comp.component] *= 1.0 + cfg.precedence_bonus * min(lead, 5.0)
    for comp in ranked:
        comp.score = float(adjusted[comp.component])
    ranked.sort(key=lambda c: (-c.score, c.component))
    return ranked


RANKERS = {"ours": ours, "baro": baro, "nsigma": nsigma}
