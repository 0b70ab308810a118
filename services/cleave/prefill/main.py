"""``cleave prefill`` / ``python -m cleave.prefill``: run one prefill worker until
SIGTERM or SIGINT, which drain it. Flags and ``CLEAVE_*`` environment variables are
the fields of ``PrefillConfig``."""

from __future__ import annotations

import sys
from typing import Sequence

from cleave.common.kv_handoff import run_worker


def run_command(command: str, argv: Sequence[str]) -> int:
    from cleave.prefill.config import PrefillConfig
    from cleave.prefill.service import PrefillServer

    return run_worker("prefill", PrefillConfig, PrefillServer, command, argv)


if __name__ == "__main__":
    sys.exit(run_command("prefill", sys.argv[1:]))
