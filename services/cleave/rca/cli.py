"""``cleave rca --metrics FILE.csv [--anomaly-time EPOCH] [--top K] [--json] [--ranker R]``:
rank the root-cause components of one metrics CSV, with evidence. Exit 2 on bad input."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from cleave.rca.changepoint import detect_anomaly_time
from cleave.rca.rankers import RANKERS
from cleave.rca.timeseries import MetricsError, load_csv, read_edges


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cleave rca", description="Rank root-cause components of a metrics CSV")
    p.add_argument("--metrics", required=True, help="CSV: a 'time' column (epoch seconds), one column per <component>_<metric>")
    p.add_argument("--anomaly-time", type=float, default=None, help="epoch seconds; detected when left out")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--ranker", choices=sorted(RANKERS), default="ours")
    p.add_argument("--split", default="first", help="component/metric split: first, last, or a separator string")
    p.add_argument("--graph", default=None, help="call graph CSV with Source,Target columns (caller, callee)")
    p.add_argument("--json", action="store_true")
    return p


def _iso(t: float | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def run_command(command: str, argv: Sequence[str]) -> int:
    try:
        return run(build_parser().parse_args(argv))
    except BrokenPipeError:
        return 0


def run(args: argparse.Namespace) -> int:
    try:
        table = load_csv(args.metrics, args.split)
        detected = args.anomaly_time is None
        t = detect_anomaly_time(table) if detected else args.anomaly_time
        if not (table.time[0] < t <= table.time[-1]):
            raise MetricsError(f"anomaly time {t} is outside the data ({table.time[0]}..{table.time[-1]}) "
                               "or leaves no normal rows before it")
        graph = None
        if args.graph:
            try:
                graph = read_edges(args.graph)
            except (OSError, KeyError) as exc:
                raise MetricsError(f"cannot read graph {args.graph}: {exc}") from None
    except MetricsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ranking = RANKERS[args.ranker](table, t, graph)[: args.top]
    if args.json:
        print(json.dumps({"anomaly_time": t, "anomaly_time_detected": detected, "ranker": args.ranker,
                          "ranking": [{"component": c.component, "score": c.score,
                                       "evidence": [{"series": e.name, "metric": e.metric, "score": e.score,
                                                     "deviation": e.deviation, "onset": e.onset} for e in c.evidence]}
                                      for c in ranking]}, indent=2))
        return 0
    print(f"anomaly time {t:.0f} ({_iso(t)} UTC, {'detected' if detected else 'given'}); ranker {args.ranker}")
    for i, c in enumerate(ranking, 1):
        print(f"{i:>2}. {c.component}  score {c.score:.2f}")
        for e in c.evidence:
            print(f"      {e.metric:<32} deviation {e.deviation:+9.2f}  onset {_iso(e.onset)}")
    return 0
