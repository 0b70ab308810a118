"""Loaders for the labelled RCA datasets, each case turned into a :class:`RcaCase`.

* **nezha** (Online Boutique, Nezha, 56 faults): ``rca_data/<date>/metric/<pod>_metric.csv``
  holds one row a minute for a whole day per pod; the component is the service (the pod
  name without its two hash suffixes); ``<date>-fault_list.json`` gives each fault's
  ``inject_timestamp`` and ``inject_pod``; ``metric/dependency.csv`` is the call graph
  (``Source,Target`` = caller, callee). A case is the window ``[t - before, t + after)``
  around the injection time ``t``.
* **petshop** (PetShop, 68 incidents): ``dataset/<scenario>/{train,test}/issue_N/`` holds
  ``metrics.csv`` (a four-line header: node, metric, statistic, ``unix_timestamp``; five
  rows five minutes apart) and ``target.json`` (``target.timestamp`` is the anomaly time,
  ``root_cause.node`` the truth); ``<scenario>/graph.csv`` is an adjacency matrix (row =
  caller, column = callee); ``<scenario>/noissue/metrics.csv``, where present, is a normal
  period used as the reference window. Nodes hold ``_``, so columns are named
  ``<node>_<metric>-<statistic>`` and split at the last ``_``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cleave.rca.timeseries import Graph, MetricTable, read_edges

DEFAULT_ROOTS = {
    "nezha": "../shared/datasets/rca/nezha-online-boutique",
    "petshop": "../shared/datasets/rca/petshop",
}
NEZHA_BEFORE_S = 600
NEZHA_AFTER_S = 300
NEZHA_SKIP = ("Time", "TimeStamp", "PodName")


@dataclass(slots=True)
class RcaCase:
    dataset: str
    case_id: str
    table: MetricTable
    anomaly_time: float
    root_cause: str
    fault_type: str
    graph: Graph | None = None
    reference: MetricTable | None = None


class DatasetMissing(FileNotFoundError):
    pass


def _require(root: Path, name: str) -> Path:
    if not root.is_dir():
        raise DatasetMissing(
            f"{name} dataset not found at {root} (expected {DEFAULT_ROOTS[name]} relative to the "
            f"repository root, or pass its location)")
    return root


def _service_of_pod(pod: str) -> str:
    return pod.rsplit("-", 2)[0]


@lru_cache(maxsize=4)
def _nezha_day(metric_dir: str) -> MetricTable:
    columns: dict[str, dict[float, float]] = {}
    for path in sorted(Path(metric_dir).glob("*_metric.csv")):
        service = _service_of_pod(path.name[: -len("_metric.csv")])
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                t = float(row["TimeStamp"])
                for key, text in row.items():
                    if key in NEZHA_SKIP or key is None:
                        continue
                    try:
                        value = float(text)
                    except (TypeError, ValueError):
                        value = np.nan
                    columns.setdefault(f"{service}_{key}", {})[t] = value
    times = np.array(sorted({t for col in columns.values() for t in col}))
    names = sorted(columns)
    values = np.array([[columns[n].get(t, np.nan) for n in names] for t in times])
    return MetricTable(times, names, values, "first")


def load_nezha(root: str | Path = DEFAULT_ROOTS["nezha"]) -> list[RcaCase]:
    root = _require(Path(root), "nezha")
    cases = []
    for day in sorted(p for p in (root / "rca_data").iterdir() if p.is_dir()):
        table = _nezha_day(str(day / "metric"))
        graph = read_edges(day / "metric" / "dependency.csv")
        faults = json.loads((day / f"{day.name}-fault_list.json").read_text())
        for hour in sorted(faults):
            for fault in faults[hour]:
                t = float(fault["inject_timestamp"])
                cases.append(RcaCase(
                    "nezha", f"{day.name}T{fault['inject_time'][11:]}",
                    table.window(t - NEZHA_BEFORE_S, t + NEZHA_AFTER_S), t,
                    _service_of_pod(fault["inject_pod"]), fault["inject_type"], graph))
    return cases


def _petshop_metrics(path: Path) -> MetricTable:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    nodes, metrics, stats = rows[0][1:], rows[1][1:], rows[2][1:]
    names = [f"{n}_{m}-{s}" for n, m, s in zip(nodes, metrics, stats)]
    data = rows[4:]
    times = np.array([float(r[0]) for r in data])
    values = np.array([[float(c) if c.strip() else np.nan for c in r[1:]] for r in data])
    return MetricTable(times, names, values, "last")


def _petshop_graph(path: Path) -> Graph:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    graph: Graph = {}
    for row in rows[1:]:
        callees = {names[j] for j, v in enumerate(row[1:]) if v.strip() and float(v) != 0}
        if callees:
            graph[row[0]] = callees
    return graph


def load_petshop(root: str | Path = DEFAULT_ROOTS["petshop"]) -> list[RcaCase]:
    root = _require(Path(root), "petshop") / "dataset"
    cases = []
    for scenario in sorted(p for p in root.iterdir() if p.is_dir()):
        graph = _petshop_graph(scenario / "graph.csv")
        noissue = scenario / "noissue" / "metrics.csv"
        reference = _petshop_metrics(noissue) if noissue.exists() else None
        for split in ("train", "test"):
            issues = sorted((scenario / split).glob("issue_*"), key=lambda p: int(p.name.split("_")[1]))
            for issue in issues:
                target = json.loads((issue / "target.json").read_text())
                command = target.get("metadata", {}).get("reproducibility", {}).get("command", "")
                cases.append(RcaCase(
                    "petshop", f"{scenario.name}/{split}/{issue.name}",
                    _petshop_metrics(issue / "metrics.csv"), float(target["target"]["timestamp"]),
                    target["root_cause"]["node"], _petshop_fault(command), graph, reference))
    return cases


def _petshop_fault(command: str) -> str:
    parts = command.split("--name")
    return parts[1].split()[0].strip("'\"").rsplit("/", 1)[-1] if len(parts) > 1 else ""


LOADERS = {"nezha": load_nezha, "petshop": load_petshop}


def load(name: str, root: str | Path | None = None) -> list[RcaCase]:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(LOADERS)}")
    return LOADERS[name](root if root is not None else DEFAULT_ROOTS[name])
