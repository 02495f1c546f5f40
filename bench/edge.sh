#!/usr/bin/env bash
# The long versions of the production-edge suites (tests/edge, issue 5):
# SIGKILL runs of 1,000 messages x 5 seeds x 20 kills, 5,000 held sessions,
# and the hypothesis suites with 20x the CI example counts.
# Figures are appended to bench/results/edge.txt; docs/robustness.md quotes them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
export MAILRELAY_LONG=1
export MAILRELAY_REPORT="$PWD/bench/results/edge.txt"
echo "# $(date -u +%FT%TZ) $(git rev-parse --short HEAD) $(nproc) cores" >>"$MAILRELAY_REPORT"
.venv/bin/python -m pytest tests/edge -p no:cacheprovider -s \
  --hypothesis-show-statistics "$@" 2>&1 | tee bench/results/edge-pytest.log
