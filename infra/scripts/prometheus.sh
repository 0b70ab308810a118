#!/usr/bin/env bash
# Prometheus (with promtool) and Alertmanager for Cleave, from Debian, without systemd:
#   prometheus.sh install   Debian's prometheus and prometheus-alertmanager, if missing
#   prometheus.sh status    exit 0 and the binaries' paths when installed, exit 3 otherwise
# `cleave up` starts both (services/cleave/observability/prometheus.py writes their
# configs into $CLEAVE_HOME/prometheus); nothing here starts a system-wide service.
# Every command is idempotent.
set -euo pipefail

say() { echo "prometheus: $*" >&2; }

installed() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null \
    && { command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; }
}

install() {
  if installed; then
    return 0
  fi
  local sudo=""
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { say "prometheus is missing and installing it needs root or sudo"; exit 1; }
    sudo="sudo"
  fi
  say "installing prometheus and prometheus-alertmanager from Debian"
  $sudo apt-get update -qq
  # RUNLEVEL=1: invoke-rc.d in the postinst then starts no system-wide daemons on
  # 9090/9093; `cleave up` starts its own on loopback with its own configs.
  $sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends prometheus prometheus-alertmanager >/dev/null
}

status() {
  if installed; then
    echo "installed $(command -v prometheus) $(command -v prometheus-alertmanager || command -v alertmanager)"
    return 0
  fi
  echo "not installed"
  return 3
}

case "${1:-}" in
  install) install ;;
  status) status ;;
  *) echo "usage: $0 install|status" >&2; exit 2 ;;
esac
