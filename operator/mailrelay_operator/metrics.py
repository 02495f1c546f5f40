"""The operator's own Prometheus metrics (served with the process's on
$MAILRELAY_OPERATOR_METRICS_LISTEN)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "mailrelay_operator_reconciles_total", "Relay reconciles, by result.", ["result"]
)
ERRORS = Counter(
    "mailrelay_operator_reconcile_errors_total",
    "Relay reconciles that failed (applying children or an unexpected error).",
)
DURATION = Histogram(
    "mailrelay_operator_reconcile_duration_seconds",
    "Time to reconcile one relay (render, apply, status).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
QUEUE_DEPTH = Gauge("mailrelay_operator_queue_depth", "Relays waiting to be reconciled.")
LAST_SUCCESS = Gauge(
    "mailrelay_operator_last_success_timestamp_seconds",
    "When a relay was last reconciled with every child applied (Unix time).",
    ["namespace", "name"],
)
EVENTS = Counter(
    "mailrelay_operator_events_total",
    "Kubernetes Events of condition transitions (k8s_events.py), by result: "
    "posted, failed, dropped (queue full), repeated (skipped within the repeat window).",
    ["result"],
)
