"""The relay pods' PodDisruptionBudget (pure builder)."""

from __future__ import annotations

from typing import Any

from mailrelay_operator import naming


def pod_disruption_budget(relay: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": naming.pdb_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "relay"),
        },
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": naming.pod_selector(relay)},
        },
    }
