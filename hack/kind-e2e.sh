#!/usr/bin/env bash
# End to end on kind, for people with Docker: a kind cluster, both images built
# and loaded, the chart installed (no cert-manager), examples/quickstart/ as
# cluster resources (next hop moved to a sink pod), and one mail sent through
# the MX Service with swaks, then found at the sink.
#
# The manifests come from hack/e2e-manifests.py, which the test suite also
# runs locally (tests/ship/test_kind_e2e.py) with a real relay and swaks: the
# two runs share the steps. The project's CI has no Docker engine, so this
# script itself is only checked there (syntax, the manifests it applies, the
# chart values it sets), never run.
#
# Usage: hack/kind-e2e.sh            create (or reuse) the cluster and run
#        hack/kind-e2e.sh --delete   delete the cluster
# Environment: KIND_CLUSTER (default mailrelay), KIND_E2E_TAG (default e2e)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-mailrelay}
TAG=${KIND_E2E_TAG:-e2e}
RELAY_IMAGE="mailrelay:$TAG"
OPERATOR_IMAGE="mailrelay-operator:$TAG"
NAMESPACE=mailrelay-system
LOCAL_PORT=${KIND_E2E_PORT:-2525}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python

log() { printf '\n== kind-e2e: %s\n' "$*"; }
die() { printf 'kind-e2e: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = --delete ]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (try --delete)"

for t in docker kind kubectl helm swaks; do
  command -v "$t" >/dev/null 2>&1 || die "$t is needed on PATH"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"

log "cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

log "building $RELAY_IMAGE and $OPERATOR_IMAGE"
docker build -f Dockerfile.relay -t "$RELAY_IMAGE" .
docker build -f Dockerfile.operator -t "$OPERATOR_IMAGE" .
kind load docker-image --name "$CLUSTER" "$RELAY_IMAGE" "$OPERATOR_IMAGE"

log "installing the chart (CRDs included, no cert-manager)"
helm upgrade --install mailrelay-operator deploy/helm/mailrelay-operator \
  --namespace "$NAMESPACE" --create-namespace --wait --timeout 5m \
  --set image.repository=mailrelay-operator --set image.tag="$TAG" \
  --set image.pullPolicy=IfNotPresent \
  --set relayImage.repository=mailrelay --set relayImage.tag="$TAG"
kubectl -n "$NAMESPACE" rollout status deploy/mailrelay-operator --timeout=180s

log "applying examples/quickstart/ with a sink pod as next hop"
"$PYTHON" hack/e2e-manifests.py \
  --next-hop "mail-sink.default.svc.cluster.local:2526" \
  --mx-service ClusterIP --sink-image "$RELAY_IMAGE" |
  kubectl apply --server-side --field-manager=kind-e2e -f -
kubectl wait --for=condition=Ready pod/mail-sink --timeout=180s
kubectl wait --for=condition=Ready mailrelay/quickstart --timeout=300s
kubectl get mailrelays,relaydomains,recipientlists,statefulsets,services

log "sending a mail through the MX Service (port-forward to quickstart-mx-quickstart-test:25)"
kubectl port-forward svc/quickstart-mx-quickstart-test "$LOCAL_PORT:25" >/tmp/kind-e2e-port-forward.log 2>&1 &
forward=$!
trap 'kill "$forward" 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$LOCAL_PORT") 2>/dev/null && break
  sleep 0.2
done
subject="kind-e2e $(date +%s)-$$"
swaks --server 127.0.0.1 --port "$LOCAL_PORT" --helo client.kind.test \
  --from sender@client.kind.test --to info@example.com \
  --header "Subject: $subject" --timeout 60

log "waiting for the mail at the sink"
for _ in $(seq 1 60); do
  if kubectl logs pod/mail-sink | grep -qF "$subject"; then
    echo "delivered: \"$subject\" reached the next hop through the relay"
    exit 0
  fi
  sleep 2
done
kubectl logs statefulset/quickstart --tail=50 || true
die "the mail did not reach the sink within 2 minutes"
