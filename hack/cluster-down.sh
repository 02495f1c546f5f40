#!/usr/bin/env bash
# Stops the single-node cluster of hack/cluster-up.sh and removes what it made:
# every pod's containers, the daemons (kube-proxy, kubelet, scheduler,
# controller-manager, apiserver, etcd, containerd and its shims), the mounts
# under /var/lib/mailrelay-node, the pods' network namespaces, our bridge,
# kube-proxy's iptables rules and our FORWARD guard, the nftables tables and
# chains the run added that are empty now (hack/netfilter.sh), then the state
# folder (volumes included); and the Docker engine if hack/docker-up.sh started
# it (hack/docker-down.sh), unless --keep-docker. Safe to call twice or when
# nothing runs (exit status 0). Only processes whose command line names our own
# folders are stopped.
set -uo pipefail

HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HACK/.." && pwd)
# shellcheck source=hack/cluster-env.sh
. "$HACK/cluster-env.sh"
# shellcheck source=hack/netfilter.sh
. "$HACK/netfilter.sh"
# shellcheck source=hack/stop.sh
. "$HACK/stop.sh"

log() { printf 'cluster-down: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "error: needs root"; exit 1; }
case "${1:-}" in
  --keep-docker) ;;
  "") bash "$HACK/docker-down.sh" ;;
  *) log "error: unknown argument: $1 (try --keep-docker)"; exit 2 ;;
esac
ASSETS=${KUBEBUILDER_ASSETS:-$REPO/.tools/bin}
if [ ! -e "$NODE_DIR" ] && [ ! -e "$RUN_DIR" ] && ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  log "nothing to stop"
  exit 0
fi
mkdir -p "$RUN_DIR"
exec 9>"$LOCK_FILE"
flock -w 120 9 || log "warning: $LOCK_FILE still held after 120s; stopping anyway"

# ours PID: alive and its command line (or a config it names) is one of ours.
ours() {
  local pid=$1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE "$NODE_DIR|$RUN_DIR"
}
stop() { # NAME
  local name=$1 pid
  pid=$(cat "$RUN_DIR/$name.pid" 2>/dev/null) || return 0
  stop_pid "$name" "$pid" 10 ours && log "stopped $name"
  rm -f "$RUN_DIR/$name.pid"
}

# The kubelet first, so it does not restart what is removed below.
stop kubelet
stop kube-proxy
if [ -S "$CONTAINERD_SOCK" ] && ours "$(cat "$RUN_DIR/containerd.pid" 2>/dev/null)"; then
  CTR=(ctr --address "$CONTAINERD_SOCK" -n k8s.io)
  tasks=$("${CTR[@]}" tasks ls -q 2>/dev/null)
  if [ -n "$tasks" ]; then
    log "killing $(echo "$tasks" | wc -l) containers"
    for t in $tasks; do "${CTR[@]}" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $tasks; do "${CTR[@]}" tasks rm -f "$t" >/dev/null 2>&1; done
  fi
  for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do
    "${CTR[@]}" containers rm "$c" >/dev/null 2>&1
  done
fi
stop kube-scheduler
stop kube-controller-manager
stop kube-apiserver
stop etcd
stop containerd
# Shims left behind by containerd (they outlive it by design).
for pid in $(pgrep -f containerd-shim 2>/dev/null); do
  if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$CONTAINERD_SOCK"; then
    kill -KILL "$pid" 2>/dev/null
  fi
done

# Mounts (volumes, secrets, rootfs, shm) under our folders, deepest first.
for _ in 1 2 3; do
  mounts=$(awk -v a="$NODE_DIR" -v b="$RUN_DIR" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts | sort -r)
  [ -n "$mounts" ] || break
  for m in $mounts; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
done

# Network namespaces made for our pods (containerd names them cni-...).
if [ -f "$NODE_DIR/netns.before" ]; then
  for ns in $(find /var/run/netns -maxdepth 1 -name 'cni-*' -printf '%f\n' 2>/dev/null | sort |
    comm -13 "$NODE_DIR/netns.before" -); do
    ip netns delete "$ns" 2>/dev/null || { umount "/var/run/netns/$ns" 2>/dev/null; rm -f "/var/run/netns/$ns"; }
  done
fi

if [ -x "$ASSETS/kube-proxy" ]; then
  "$ASSETS/kube-proxy" --cleanup >/dev/null 2>&1 || true
fi
# The kubelet's own chains (its canaries, and KUBE-FIREWALL on INPUT/OUTPUT).
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null || continue
  for table in filter nat mangle; do
    for hook in INPUT OUTPUT; do
      while "$ipt" -t "$table" -D "$hook" -j KUBE-FIREWALL 2>/dev/null; do :; done
    done
    for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
      "$ipt" -t "$table" -F "$chain" 2>/dev/null && "$ipt" -t "$table" -X "$chain" 2>/dev/null
    done
  done
done
while iptables -D FORWARD -j "$FWD_CHAIN" 2>/dev/null; do :; done
iptables -F "$FWD_CHAIN" 2>/dev/null && iptables -X "$FWD_CHAIN" 2>/dev/null
# After the last iptables command: the tables and base chains it all left empty.
nft_tidy "$NODE_DIR/nft.before"
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link delete "$BRIDGE" && log "removed the bridge $BRIDGE"
fi
if [ -f "$NODE_DIR/ip_forward.before" ]; then
  sysctl -qw "net.ipv4.ip_forward=$(cat "$NODE_DIR/ip_forward.before")"
fi
if [ -f "$NODE_DIR/bridge-nf-call-iptables.before" ]; then
  sysctl -qw "net.bridge.bridge-nf-call-iptables=$(cat "$NODE_DIR/bridge-nf-call-iptables.before")" \
    || log "warning: could not restore net.bridge.bridge-nf-call-iptables"
fi
if [ -f "$NODE_DIR/br_netfilter.loaded" ]; then
  modprobe -r br_netfilter 2>/dev/null || log "note: br_netfilter stays loaded (in use)"
fi

if awk -v a="$NODE_DIR" 'index($2, a) == 1' /proc/mounts | grep -q .; then
  log "warning: mounts remain under $NODE_DIR; not removing it"
  exit 1
fi
rm -rf "$NODE_DIR" "${RUN_DIR:?}"/*
log "cluster is down"
