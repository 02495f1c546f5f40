#!/usr/bin/env bash
# Sets up everything the tests need, then runs every test: lint, types,
# generated files, and the pytest suite (kube tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
if [ -x hack/install-tools.sh ]; then
  bash hack/install-tools.sh
fi
export KUBEBUILDER_ASSETS="${KUBEBUILDER_ASSETS:-$PWD/.tools/bin}"
echo "== ruff"
.venv/bin/ruff check relay mailrelay_api operator tests bench hack
echo "== mypy"
.venv/bin/mypy
echo "== generated CRDs up to date"
.venv/bin/python -m mailrelay_api.crdgen --check
echo "== pytest"
.venv/bin/python -m pytest "$@"
