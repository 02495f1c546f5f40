#!/usr/bin/env bash
# Stops the Docker engine hack/docker-up.sh started, and only that one: the pid
# in /run/mailrelay/dockerd.pid whose command line names our --exec-root. A
# user's engine, or one docker-up.sh found already running, is left alone.
# Safe to call twice or when nothing runs (exit status 0). hack/cluster-down.sh
# calls it.
set -uo pipefail

log() { printf 'docker-down: %s\n' "$*" >&2; }
# shellcheck source=hack/docker-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/docker-env.sh"
# shellcheck source=hack/stop.sh
. "$(dirname "${BASH_SOURCE[0]}")/stop.sh"

# names PID TEXT: PID is alive and its command line (arguments joined by spaces,
# each followed by one) holds TEXT.
names() {
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$2"
}
ours() { names "$1" "--exec-root $DOCKER_EXEC_ROOT "; } # dockerd of docker-up.sh

pid=$(cat "$DOCKERD_PIDFILE" 2>/dev/null)
# dockerd stops its containers and its own containerd on SIGTERM.
if ! stop_pid dockerd "$pid" 30 ours; then
  log "no dockerd of hack/docker-up.sh runs"
  exit 0
fi
# What it started under our exec-root (containerd, shims) outlives a SIGKILL.
for p in $(pgrep -f -- "$DOCKER_EXEC_ROOT/" 2>/dev/null); do
  names "$p" "$DOCKER_EXEC_ROOT/" && kill -KILL "$p" 2>/dev/null
done
rm -f "$DOCKERD_PIDFILE"
log "stopped dockerd (pid $pid)"
