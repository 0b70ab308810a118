"""``cleave-operator``: runs the kopf handlers of ``cleave.operator.handlers``.

One replica, no peering (``--standalone``); it watches the namespaces given by
``--namespace`` (repeatable) or ``$CLEAVE_WATCH_NAMESPACES`` (comma-separated), else the
whole cluster. ``--liveness`` serves kopf's health endpoint, e.g. ``http://0.0.0.0:8080/healthz``.
"""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleave-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", "-n", action="append", default=[],
                        help="namespace to watch (repeatable); default: $CLEAVE_WATCH_NAMESPACES, else all")
    parser.add_argument("--liveness", default=os.environ.get("CLEAVE_OPERATOR_LIVENESS", ""),
                        help="kopf liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--prometheus-url", default=os.environ.get("CLEAVE_PROMETHEUS_URL", ""),
                        help="Prometheus the autoscaler queries, e.g. http://prometheus:9090 "
                             "(default: $CLEAVE_PROMETHEUS_URL; none: no autoscaling)")
    parser.add_argument("--verbose", action="store_true", help="debug logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.prometheus_url:
        os.environ["CLEAVE_PROMETHEUS_URL"] = args.prometheus_url  # read by the handlers
    import kopf

    import cleave.operator.handlers  # noqa: F401  (registers the handlers)

    namespaces = args.namespace or [
        ns.strip() for ns in os.environ.get("CLEAVE_WATCH_NAMESPACES", "").split(",") if ns.strip()]
    kopf.configure(verbose=args.verbose)
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=args.liveness or None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
