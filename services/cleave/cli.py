"""The ``cleave`` command. Each subcommand lives with the code it drives and
registers itself through ``add_parser(subparsers)``; imports are lazy so that
``cleave down`` does not pay for importing torch."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": "cleave.router.main",
    "router": "cleave.router.service",
    "up": "cleave.launcher",
    "down": "cleave.launcher",
    "status": "cleave.launcher",
    "model": "cleave.modelzoo.cli",
    "prefill": "cleave.prefill.main",
    "decode": "cleave.decode.main",
    "kvstore": "cleave.kvstore.main",
    "expert": "cleave.expert.main",
    "events": "cleave.events.consumer",
    "rca": "cleave.rca.cli",
    "rca-eval": "cleave.rca.evaluate",
    "fault": "cleave.rca.faults",
    "diagnose": "cleave.rca.diagnose",
    "agent": "cleave.rca.service",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(prog="cleave", description="Cleave LLM serving platform")
        parser.add_argument("command", choices=sorted(SUBCOMMANDS))
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    return int(module.run_command(argv[0], argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
