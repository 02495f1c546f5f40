#!/usr/bin/env bash
# Starts Debian's Docker engine (package docker.io: dockerd, with the
# containerd and runc it brings) for building the images, if none answers yet.
# Installs the packages with apt-get when they are missing.
#
# The engine gets no network of its own: no docker0 bridge, no iptables rules,
# no NAT (--bridge=none --iptables=false --ip-masq=false). Image builds run with
# `docker build --network=none`; they need nothing from outside (hack/build-images.sh
# builds the base and the wheels on the host).
#
# The engine is left running for the next build (its pid is in
# /run/mailrelay/dockerd.pid; `kill` that pid stops it).
set -euo pipefail

log() { printf 'docker-up: %s\n' "$*" >&2; }
die() { printf 'docker-up: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=hack/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

RUN_DIR=/run/mailrelay
SOCK=/var/run/docker.sock
DOCKER=(docker -H "unix://$SOCK")

# An engine that already runs (a user's Docker, or ours from an earlier run) is used as it is.
if "${DOCKER[@]}" info >/dev/null 2>&1; then
  log "a Docker engine already answers on $SOCK"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "no Docker engine answers, and starting one needs root"

apt_ensure docker.io containerd runc mmdebstrap
[ -x /usr/sbin/dockerd ] || die "/usr/sbin/dockerd is missing (package docker.io)"

mkdir -p "$RUN_DIR"
log "starting dockerd (log: $RUN_DIR/dockerd.log)"
# --oom-score-adjust=0: a negative oom_score_adj is refused on these machines,
# even for root.
setsid /usr/sbin/dockerd \
  --host "unix://$SOCK" \
  --pidfile "$RUN_DIR/dockerd.pid" \
  --exec-root /run/mailrelay/docker \
  --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
  --oom-score-adjust=0 \
  </dev/null >>"$RUN_DIR/dockerd.log" 2>&1 &
for _ in $(seq 1 120); do
  "${DOCKER[@]}" info >/dev/null 2>&1 && { log "dockerd is up"; exit 0; }
  sleep 0.5
done
tail -n 30 "$RUN_DIR/dockerd.log" >&2
die "dockerd did not answer within 60 s"
