"""Evaluation on the labelled datasets: AC@1, AC@3 and Avg@5 at the component level for
every ranker, in one run. ``cleave rca-eval [--datasets nezha,petshop] [--json]`` or
``python -m cleave.rca.evaluate``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from cleave.rca import datasets
from cleave.rca.metrics import ac_at_k, avg_at_k
from cleave.rca.rankers import RANKERS

ORDER = ("baro", "nsigma", "ours")


def evaluate_cases(cases: Sequence[datasets.RcaCase], rankers: Sequence[str] = ORDER) -> dict[str, dict]:
    """``{ranker: {"cases", "ac@1", "ac@3", "avg@5", "ranks"}}`` over ``cases``."""
    truths = [c.root_cause for c in cases]
    results = {}
    for name in rankers:
        rankings = [[s.component for s in RANKERS[name](c.table, c.anomaly_time, c.graph, c.reference)]
                    for c in cases]
        results[name] = {
            "cases": len(cases),
            "ac@1": ac_at_k(rankings, truths, 1),
            "ac@3": ac_at_k(rankings, truths, 3),
            "avg@5": avg_at_k(rankings, truths, 5),
            "ranks": {c.case_id: (r.index(c.root_cause) + 1 if c.root_cause in r else None)
                      for c, r in zip(cases, rankings)},
        }
    return results


def evaluate(names: Sequence[str], roots: dict[str, str] | None = None, limit: int | None = None,
             rankers: Sequence[str] = ORDER) -> dict[str, dict[str, dict]]:
    roots = roots or {}
    out = {}
    for name in names:
        cases = datasets.load(name, roots.get(name))
        out[name] = evaluate_cases(cases[:limit] if limit else cases, rankers)
    return out


def format_table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| dataset | cases | ranker | AC@1 | AC@3 | Avg@5 |", "| --- | ---: | --- | ---: | ---: | ---: |"]
    for dataset, by_ranker in results.items():
        for ranker, r in by_ranker.items():
            lines.append(f"| {dataset} | {r['cases']} | {ranker} | {r['ac@1']:.3f} | {r['ac@3']:.3f} | {r['avg@5']:.3f} |")
    return "\n".join(lines)


def build_parser(prog: str = "cleave rca-eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="AC@1, AC@3, Avg@5 of BARO, NSigma and ours on the RCA datasets")
    p.add_argument("--datasets", default="nezha,petshop", help="comma-separated: nezha, petshop")
    p.add_argument("--nezha-root", default=datasets.DEFAULT_ROOTS["nezha"])
    p.add_argument("--petshop-root", default=datasets.DEFAULT_ROOTS["petshop"])
    p.add_argument("--limit", type=int, default=None, help="only the first N cases of each dataset")
    p.add_argument("--json", action="store_true", help="print JSON (with per-case ranks)")
    return p


def run_command(command: str, argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",") if n.strip()]
    unknown = [n for n in names if n not in datasets.LOADERS]
    if unknown:
        print(f"error: unknown dataset(s) {', '.join(unknown)}; known: {', '.join(datasets.LOADERS)}", file=sys.stderr)
        return 2
    try:
        results = evaluate(names, {"nezha": args.nezha_root, "petshop": args.petshop_root}, args.limit)
    except datasets.DatasetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
        print(f"\n(cleave rca-eval --datasets {','.join(names)}; {datetime.now(timezone.utc):%Y-%m-%d})")
    return 0


if __name__ == "__main__":
    sys.exit(run_command("rca-eval", sys.argv[1:]))
