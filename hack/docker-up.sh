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
# /run/mailrelay/dockerd.pid); hack/docker-down.sh stops it, and so does
# hack/cluster-down.sh at the end of a cluster run. An engine this script did
# not start is never stopped.
set -euo pipefail

log() { printf 'docker-up: %s\n' "$*" >&2; }
die() { printf 'docker-up: error: %s\n' "$*" >&2; exit 1; }
# shellcheck source=hack/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
# shellcheck source=hack/docker-env.sh
. "$(dirname "${BASH_SOURCE[0]}")/docker-env.sh"

DOCKER=(docker -H "unix://$DOCKER_SOCK")

# An engine that already runs (a user's Docker, or ours from an earlier run) is used as it is.
if "${DOCKER[@]}" info >/dev/null 2>&1; then
  log "a Docker engine already answers on $DOCKER_SOCK"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "no Docker engine answers, and starting one needs root"

apt_ensure docker.io containerd runc mmdebstrap
[ -x /usr/sbin/dockerd ] || die "/usr/sbin/dockerd is missing (package docker.io)"

mkdir -p "$DOCKER_RUN_DIR"
log "starting dockerd (log: $DOCKERD_LOG)"
# --oom-score-adjust=0: a negative oom_score_adj is refused on these machines,
# even for root.
setsid /usr/sbin/dockerd \
  --host "unix://$DOCKER_SOCK" \
  --pidfile "$DOCKERD_PIDFILE" \
  --exec-root "$DOCKER_EXEC_ROOT" \
  --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
  --oom-score-adjust=0 \
  </dev/null >>"$DOCKERD_LOG" 2>&1 &
for _ in $(seq 1 120); do
  "${DOCKER[@]}" info >/dev/null 2>&1 && { log "dockerd is up"; exit 0; }
  sleep 0.5
done
tail -n 30 "$DOCKERD_LOG" >&2
die "dockerd did not answer within 60 s"
