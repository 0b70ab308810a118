#!/usr/bin/env bash
# Prometheus (with promtool) and Alertmanager for Cleave, from Debian, without systemd:
#   prometheus.sh install   Debian's prometheus and prometheus-alertmanager, if missing
#   prometheus.sh status    exit 0 and the binaries' paths when installed, exit 3 otherwise
# `cleave up` starts both (services/cleave/observability/prometheus.py writes their
# configs into $CLEAVE_HOME/prometheus); nothing here starts a system-wide service.
# Every command is idempotent.
set -euo pipefail
source "$(dirname "$0")/debian.sh"

say() { echo "prometheus: $*" >&2; }

installed() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null \
    && { command -v prometheus-alertmanager >/dev/null || command -v alertmanager >/dev/null; }
}

install() {
  if installed; then
    return 0
  fi
  debian_install prometheus prometheus prometheus-alertmanager
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
