#!/usr/bin/env bash
# Headless Chromium from Debian, for the tests that render the router's /dashboard:
#   chromium.sh install   Debian's chromium, if missing (install.sh --test runs it)
# Idempotent; starts nothing.
set -euo pipefail

[[ "${1:-}" == install ]] || { echo "usage: $0 install" >&2; exit 2; }
command -v chromium >/dev/null && exit 0
sudo=""
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null || { echo "chromium: missing, and installing it needs root or sudo" >&2; exit 1; }
  sudo="sudo"
fi
echo "chromium: installing chromium from Debian" >&2
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends chromium >/dev/null
