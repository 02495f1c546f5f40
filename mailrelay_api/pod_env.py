"""The environment the operator sets in relay pods and the relay reads: named once here,
since neither imports the other."""

from __future__ import annotations

# The pod's CPU limit (else request), through the downward API, in whole CPUs:
# `--workers auto` counts no more CPUs than the pod may use.
CPU_LIMIT_ENV = "MAILRELAY_CPU_LIMIT"
