#!/usr/bin/env bash
# Stops the control plane started by hack/kube-up.sh for "$KUBECONFIG"
# (default <repo>/.tools/run/kubeconfig): reads "$KUBECONFIG.state", stops
# kube-apiserver then etcd, removes their temp folder, the kubeconfig and the
# state file. Safe to call twice or when nothing runs (exit status 0).
# Only processes whose command line names the recorded temp folder are killed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf 'kube-down: %s\n' "$*" >&2; }
die() { printf 'kube-down: error: %s\n' "$*" >&2; exit 1; }

KUBECONFIG=${KUBECONFIG:-$REPO/.tools/run/kubeconfig}
case "$KUBECONFIG" in
  *:*) die "KUBECONFIG must be a single file, not a list: $KUBECONFIG" ;;
esac
KUBECONFIG=$(realpath -m "$KUBECONFIG")
STATE_FILE="$KUBECONFIG.state"
# Not "$KUBECONFIG.lock": client-go uses that name for its own lock file.
LOCK_FILE="$KUBECONFIG.kube-up-lock"
MARKER='# Written by mailrelay hack/kube-up.sh; hack/kube-down.sh removes it.'

if [ ! -f "$STATE_FILE" ]; then
  log "nothing to stop (no $STATE_FILE)"
  exit 0
fi

if [ -d "$(dirname "$KUBECONFIG")" ]; then
  exec 9>"$LOCK_FILE"
  # Cleanup goes on even if the lock cannot be had: better than leaking processes.
  flock -w 60 9 || log "warning: $LOCK_FILE is still held after 60s; stopping anyway"
fi
[ -f "$STATE_FILE" ] || { log "nothing to stop (no $STATE_FILE)"; exit 0; }

state_get() { sed -n "s/^$1=//p" "$STATE_FILE" | head -n1; }
STATE_DIR=$(state_get STATE_DIR)

ours() { # PID is alive (not a zombie) and its command line names STATE_DIR
  local pid=$1
  [ -n "$pid" ] && [ -n "$STATE_DIR" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$STATE_DIR"
}

stop() { # NAME PID
  local name=$1 pid=$2 i
  ours "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do # up to 10 s
    ours "$pid" || { log "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 10s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    ours "$pid" || return 0
    sleep 0.1
  done
  die "could not stop $name (pid $pid)"
}

# Every recorded pid (a retried start can record several), apiserver first.
while read -r pid; do stop kube-apiserver "$pid"; done < <(sed -n 's/^APISERVER_PID=//p' "$STATE_FILE")
while read -r pid; do stop etcd "$pid"; done < <(sed -n 's/^ETCD_PID=//p' "$STATE_FILE")

# Remove only what kube-up.sh created.
case "$STATE_DIR" in
  */mailrelay-kube.*) [ -d "$STATE_DIR" ] && rm -rf "$STATE_DIR" ;;
  "") ;;
  *) log "not removing unexpected state dir $STATE_DIR" ;;
esac
if [ -f "$KUBECONFIG" ] && grep -qxF "$MARKER" "$KUBECONFIG"; then
  rm -f "$KUBECONFIG"
fi
# The lock file stays: removing it could let two callers lock different files.
rm -f "$STATE_FILE"
log "control plane for $KUBECONFIG is down"
