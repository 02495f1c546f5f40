#!/usr/bin/env bash
# Copies deploy/crds/*.yaml (generated from mailrelay_api/schema.py) into the
# Helm chart, which cannot hold a symlink. `--check` exits 1 if they differ.
# Run it after `make crds`; tests/ship/test_chart.py runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
src=deploy/crds
dst=deploy/helm/mailrelay-operator/files/crds
if [ "${1:-}" = --check ]; then
  stale=0
  for f in "$src"/*.yaml; do
    cmp -s "$f" "$dst/$(basename "$f")" || { echo "stale: $dst/$(basename "$f")" >&2; stale=1; }
  done
  for f in "$dst"/*.yaml; do
    [ -e "$src/$(basename "$f")" ] || { echo "not in $src: $f" >&2; stale=1; }
  done
  if [ "$stale" = 1 ]; then
    echo "run hack/sync-chart-crds.sh to copy $src into the chart" >&2
    exit 1
  fi
  exit 0
fi
mkdir -p "$dst"
rm -f "$dst"/*.yaml
cp "$src"/*.yaml "$dst"/
echo "copied the CRDs of $src into $dst"
