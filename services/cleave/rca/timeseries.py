"""A metric table: one time axis (epoch seconds) and one column per series named
``<component>_<metric>``.

The component is the part of the name before the separator. ``split="first"`` (the
default, the public RCA benchmarks' convention) cuts at the first ``_``; ``"last"`` cuts at
the last one, for component names that themselves hold ``_`` (PetShop's
``payforadoption_AWS::ECS::Container``); any other string is used as the separator itself
(e.g. ``"__"``), cut at its first occurrence. Component names may hold ``-``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TIME_COLUMNS = ("time", "timestamp")

# caller -> callees, by component name
Graph = dict[str, set[str]]


class MetricsError(ValueError):
    """The metrics input cannot be used; the message says why."""


def split_name(name: str, split: str = "first") -> tuple[str, str]:
    """``(component, metric)`` of a series name; see the module docstring for ``split``."""
    if split == "first":
        component, sep, metric = name.partition("_")
    elif split == "last":
        component, sep, metric = name.rpartition("_")
    else:
        component, sep, metric = name.partition(split)
    if not sep or not component or not metric:
        raise MetricsError(f"series name {name!r} is not <component>_<metric> (split={split!r})")
    return component, metric


@dataclass(slots=True)
class MetricTable:
    """``values[i, j]`` is series ``names[j]`` at ``time[i]``; NaN where missing."""

    time: np.ndarray
    names: list[str]
    values: np.ndarray
    split: str = "first"
    components: list[str] = field(init=False)
    metrics: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.time = np.asarray(self.time, dtype=float)
        self.values = np.asarray(self.values, dtype=float).reshape(len(self.time), len(self.names))
        order = np.argsort(self.time, kind="stable")
        self.time, self.values = self.time[order], self.values[order]
        pairs = [split_name(n, self.split) for n in self.names]
        self.components = [c for c, _ in pairs]
        self.metrics = [m for _, m in pairs]

    @property
    def num_series(self) -> int:
        return len(self.names)

    def window(self, start: float, end: float) -> MetricTable:
        """Rows with ``start <= time < end``."""
        keep = (self.time >= start) & (self.time < end)
        return MetricTable(self.time[keep], list(self.names), self.values[keep], self.split)

    def to_csv(self, path: str | Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["time", *self.names])
            for t, row in zip(self.time, self.values):
                writer.writerow([repr(float(t)), *("" if math.isnan(v) else repr(float(v)) for v in row)])


def _number(text: str, where: str) -> float:
    text = text.strip()
    if text == "" or text.lower() in ("nan", "null", "none"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise MetricsError(f"non-numeric value {text!r} at {where}") from None


def load_csv(path: str | Path, split: str = "first") -> MetricTable:
    """Read a CSV with a ``time`` (or ``timestamp``) column in epoch seconds and one
    column per series. Empty cells are missing values; anything else non-numeric is an error."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise MetricsError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise MetricsError(f"{path} is empty")
    header = [h.strip() for h in rows[0]]
    lowered = [h.lower() for h in header]
    time_col = next((lowered.index(c) for c in TIME_COLUMNS if c in lowered), None)
    if time_col is None:
        raise MetricsError(f"{path} has no 'time' column (epoch seconds); columns: {header[:5]}")
    series_cols = [j for j in range(len(header)) if j != time_col]
    if not series_cols:
        raise MetricsError(f"{path} has a time column but no series columns")
    times, values = [], []
    for i, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise MetricsError(f"{path} line {i}: {len(row)} cells, header has {len(header)}")
        t = _number(row[time_col], f"{path} line {i}, column 'time'")
        if math.isnan(t):
            raise MetricsError(f"{path} line {i}: empty time")
        times.append(t)
        values.append([_number(row[j], f"{path} line {i}, column {header[j]!r}") for j in series_cols])
    if len(times) < 3:
        raise MetricsError(f"{path} has {len(times)} rows; at least 3 are needed")
    return MetricTable(np.array(times), [header[j] for j in series_cols], np.array(values), split)


def read_edges(path: str | Path) -> Graph:
    """A call graph from a CSV with ``Source`` (caller) and ``Target`` (callee) columns."""
    graph: Graph = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            graph.setdefault(row["Source"], set()).add(row["Target"])
    return graph
