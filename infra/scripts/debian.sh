# Sourced by the infra scripts. debian_install NAME PACKAGE... installs Debian packages
# with apt-get (through sudo when not root), waiting for a concurrent apt to finish.
# RUNLEVEL=1: invoke-rc.d in the packages' postinst then starts no system-wide daemon;
# Cleave starts its own, with its own settings, on its own ports.
debian_install() {
  local name="$1" sudo=""
  shift
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || { echo "$name: $* missing; installing needs root or sudo" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "$name: installing $* from Debian" >&2
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 \
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends "$@" >/dev/null
}
