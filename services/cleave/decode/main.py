"""``cleave decode`` / ``python -m cleave.decode``: run one decode worker until
SIGTERM or SIGINT, which drain it. Flags and ``CLEAVE_*`` environment variables are
the fields of ``DecodeConfig``."""

from __future__ import annotations

import sys
from typing import Sequence

from cleave.common.kv_handoff import run_worker


def run_command(command: str, argv: Sequence[str]) -> int:
    from cleave.decode.config import DecodeConfig
    from cleave.decode.service import DecodeServer

    return run_worker("decode", DecodeConfig, DecodeServer, command, argv)


if __name__ == "__main__":
    sys.exit(run_command("decode", sys.argv[1:]))
