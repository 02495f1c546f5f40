#!/usr/bin/env bash
# Loads images from the Docker engine into the node's containerd (the k8s.io
# namespace the kubelet uses): docker save IMAGE... | ctr images import -.
# Pods then run them with imagePullPolicy Never or IfNotPresent.
#
# Usage: hack/cluster-load.sh IMAGE...
set -euo pipefail
HACK=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=hack/cluster-env.sh
. "$HACK/cluster-env.sh"
[ $# -gt 0 ] || { echo "usage: $0 IMAGE..." >&2; exit 2; }
[ -S "$CONTAINERD_SOCK" ] || { echo "cluster-load: the node's containerd is not running (hack/cluster-up.sh)" >&2; exit 1; }
docker -H unix:///var/run/docker.sock save "$@" |
  ctr --address "$CONTAINERD_SOCK" -n k8s.io images import --all-platforms - >&2
echo "cluster-load: loaded $*" >&2
