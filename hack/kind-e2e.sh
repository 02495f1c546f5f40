#!/usr/bin/env bash
# The real-cluster end-to-end suite (tests/cluster/) on kind, for people with
# Docker: the same image build (hack/build-images.sh), the same test module as
# the project's CI runs on its own node (hack/cluster-up.sh), so what CI proves
# is what a kind user runs.
#
#   1. a kind cluster (created, or reused if it exists);
#   2. both images built by hack/build-images.sh (on your Docker engine; the base
#      is made with mmdebstrap on Debian, or set BASE_IMAGE=python:3.11.14-slim-bookworm)
#      and loaded with `kind load docker-image`;
#   3. routes from this machine to the kind node's pod and Service ranges (the
#      suite sends mail to ClusterIPs and pod IPs, as on CI's node), removed at
#      the end (needs root or sudo);
#   4. MAILRELAY_CLUSTER=kind pytest -m cluster tests/cluster/: the chart,
#      examples/two-mx/, mail, refusals, live edits, pod loss, scale-down,
#      rolling upgrade, uninstall.
#
# Usage: hack/kind-e2e.sh            create (or reuse) the cluster and run
#        hack/kind-e2e.sh --delete   delete the cluster
# Environment: KIND_CLUSTER (default mailrelay), MAILRELAY_E2E_TAG (default e2e)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-mailrelay}
TAG=${MAILRELAY_E2E_TAG:-e2e}
PYTHON=${PYTHON:-.venv/bin/python}

log() { printf '\n== kind-e2e: %s\n' "$*"; }
die() { printf 'kind-e2e: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = --delete ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (try --delete)"

for t in docker kind kubectl helm swaks openssl ip; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed on PATH"
done
[ -x "$PYTHON" ] || die "$PYTHON not found; run hack/setup.sh"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo

log "cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
KUBECONFIG=$(mktemp)
export KUBECONFIG
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"

log "building mailrelay:$TAG and mailrelay-operator:$TAG"
bash hack/build-images.sh --tag "$TAG"
kind load docker-image --name "$CLUSTER" "mailrelay:$TAG" "mailrelay-operator:$TAG"

log "routes to the node's pod and Service ranges"
node_ip=$(kubectl get node "$CLUSTER-control-plane" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
pod_cidr=$(kubectl get node "$CLUSTER-control-plane" -o jsonpath='{.spec.podCIDR}')
svc_cidr=$(kubectl get --raw /api/v1/namespaces/default/services/kubernetes |
  "$PYTHON" -c 'import json,sys,ipaddress; ip=json.load(sys.stdin)["spec"]["clusterIP"]; print(ipaddress.ip_network(ip + "/16", strict=False))')
routes=("$pod_cidr" "$svc_cidr")
cleanup() {
  for r in "${routes[@]}"; do $SUDO ip route del "$r" via "$node_ip" 2>/dev/null || true; done
  rm -f "$KUBECONFIG"
}
trap cleanup EXIT
for r in "${routes[@]}"; do $SUDO ip route replace "$r" via "$node_ip"; done

log "tests/cluster/ against kind"
MAILRELAY_CLUSTER=kind MAILRELAY_E2E_TAG=$TAG KIND_CLUSTER=$CLUSTER \
  "$PYTHON" -m pytest -m cluster tests/cluster/ -v
