"""The relay pods' NetworkPolicy (pure builder).

Ingress: SMTP from anywhere (the pods' smtp and PROXY ports, behind the MX
Services); handover only from peer relay pods; metrics (also /queue and
/drain) from the operator's namespace and the metrics namespace.
Egress: DNS, handover to peers, and the mail ports the accepted domains' next
hops use (25, 465, 587 and any other they were allowed); when no accepted
next hop is inside the cluster, not to the cluster's service and pod ranges
either, so a name that resolves to an internal address leads nowhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mailrelay_api.claims import inside_cluster, is_loopback
from mailrelay_api.schema import DEFAULT_NEXT_HOP_PORTS
from mailrelay_api.spec import NextHopSpec
from mailrelay_operator import naming
from mailrelay_operator.settings import NetworkSettings

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server
DNS_PORT = 53


def _ports(numbers: Iterable[int], *protocols: str) -> list[dict[str, Any]]:
    return [{"port": p, "protocol": proto} for p in sorted(set(numbers)) for proto in protocols]


def _namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: name}}}


def _anywhere(excluded: Iterable[str]) -> list[dict[str, Any]]:
    v4 = [c for c in excluded if ":" not in c]
    v6 = [c for c in excluded if ":" in c]
    return [
        {"ipBlock": {"cidr": "0.0.0.0/0", **({"except": v4} if v4 else {})}},
        {"ipBlock": {"cidr": "::/0", **({"except": v6} if v6 else {})}},
    ]


def network_policy(
    relay: dict[str, Any], next_hops: Iterable[NextHopSpec], settings: NetworkSettings
) -> dict[str, Any]:
    peers = [{"podSelector": {"matchLabels": naming.pod_selector(relay)}}]
    scraping = {settings.operator_namespace, settings.metrics_namespace}
    scrapers = [_namespace(ns) for ns in sorted(n for n in scraping if n)]
    hops = list(next_hops)
    # Loopback never meets a NetworkPolicy: it does not count as internal.
    internal = any(
        inside_cluster(h.host, settings.cluster) and not is_loopback(h.host) for h in hops
    )
    excluded = [] if internal else [str(c) for c in settings.cluster.cidrs]
    mail_ports = {*DEFAULT_NEXT_HOP_PORTS, *(h.port for h in hops)}
    ingress: list[dict[str, Any]] = [
        {"ports": _ports([naming.SMTP_PORT, naming.PROXY_PORT], "TCP")},
        {"from": peers, "ports": _ports([naming.HANDOVER_PORT], "TCP")},
    ]
    if scrapers:
        ingress.append({"from": scrapers, "ports": _ports([naming.METRICS_PORT], "TCP")})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": naming.network_policy_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "relay"),
        },
        "spec": {
            "podSelector": {"matchLabels": naming.pod_selector(relay)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": [
                {"ports": _ports([DNS_PORT], "UDP", "TCP")},
                {"to": peers, "ports": _ports([naming.HANDOVER_PORT], "TCP")},
                {"to": _anywhere(excluded), "ports": _ports(mail_ports, "TCP")},
            ],
        },
    }
