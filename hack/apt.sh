# Sourced by the root-only scripts that need Debian packages (cluster-up.sh,
# docker-up.sh): installs those of the given packages that are missing.
# The caller defines log(). hack/setup.sh has its own (sudo, debconf answers).
# shellcheck shell=bash

apt_ensure() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
