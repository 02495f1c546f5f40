"""relay.metrics.child: labels() once per label values, the same series after."""

from __future__ import annotations

from prometheus_client import REGISTRY

from relay import metrics


def test_child_is_the_labelled_series_kept() -> None:
    domain = "child-test.example"
    first = metrics.child(metrics.DELIVERED, domain)
    assert metrics.child(metrics.DELIVERED, domain) is first
    assert first is metrics.DELIVERED.labels(domain)
    assert metrics.child(metrics.BOUNCED, domain) is not first  # per metric too
    before = REGISTRY.get_sample_value("mailrelay_delivered_total", {"domain": domain}) or 0.0
    first.inc()
    metrics.child(metrics.DELIVERED, domain).inc()
    assert REGISTRY.get_sample_value("mailrelay_delivered_total", {"domain": domain}) == before + 2
