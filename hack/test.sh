#!/usr/bin/env bash
# Sets up everything the tests need, then runs every test: lint, types,
# generated files, the pytest suite (kube tests included), and the real
# cluster suite (tests/cluster/: both images built with Docker, a one-node
# cluster on this machine, the product as pods; needs root).
#
# Arguments go to the first pytest run. MAILRELAY_SKIP_CLUSTER=1 leaves the
# real cluster suite out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
if [ -x hack/install-tools.sh ]; then
  bash hack/install-tools.sh
fi
export KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$PWD/.tools/bin}"
echo "== ruff"
.venv/bin/ruff check relay mailrelay_api operator tests bench hack
.venv/bin/ruff format --check relay mailrelay_api operator tests bench hack
echo "== mypy"
.venv/bin/mypy
echo "== generated CRDs up to date"
.venv/bin/python -m mailrelay_api.crdgen --check
echo "== pytest"
.venv/bin/python -m pytest "$@"
if [ "${MAILRELAY_SKIP_CLUSTER:-0}" != 1 ]; then
  echo "== real cluster: tests/cluster/"
  # The suite stops its node itself; this is for a run killed half-way.
  trap 'bash hack/cluster-down.sh >/dev/null 2>&1 || true' EXIT
  .venv/bin/python -m pytest -m cluster tests/cluster/ -v
fi
