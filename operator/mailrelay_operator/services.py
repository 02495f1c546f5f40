"""The relay's Services (pure builders): a headless one for the StatefulSet,
and one per spec.mx entry on port 25."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailrelay_api.spec import relay_spec
from mailrelay_operator import naming

# externalTrafficPolicy is only valid where traffic comes from outside.
_EXTERNAL_TYPES = ("LoadBalancer", "NodePort")


def headless_service(relay: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": naming.headless_service_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "pods"),
        },
        "spec": {
            "clusterIP": "None",
            # A draining pod is not ready (it refuses mail) but must keep its
            # DNS name: the operator asks it for its queue, peers take its mail.
            "publishNotReadyAddresses": True,
            "selector": naming.pod_selector(relay),
            "ports": [
                {"name": "smtp", "port": naming.SMTP_PORT, "targetPort": "smtp", "protocol": "TCP"},
                {
                    "name": "metrics",
                    "port": naming.METRICS_PORT,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                },
                {
                    "name": "handover",
                    "port": naming.HANDOVER_PORT,
                    "targetPort": "handover",
                    "protocol": "TCP",
                },
            ],
        },
    }


def mx_services(
    relay: dict[str, Any], kept: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """kept: hostname -> name of an existing MX Service (naming.mx_service_names)."""
    proxy = relay_spec(relay).proxy_protocol.enabled
    out = []
    names = naming.mx_service_names(relay, kept)
    for entry, name in zip(naming.mx_entries(relay), names, strict=True):
        svc_opts = entry.service
        svc_type = svc_opts.type
        selector = naming.pod_selector(relay)
        if entry.pods is not None:
            selector[naming.mx_pods_label(entry.hostname)] = "true"
        spec: dict[str, Any] = {
            "type": svc_type,
            "selector": selector,
            "ports": [
                {
                    "name": "smtp",
                    "port": naming.SERVICE_PORT,
                    # With PROXY protocol the load balancer talks to the proxy port.
                    "targetPort": "smtp-proxy" if proxy else "smtp",
                    "protocol": "TCP",
                }
            ],
        }
        if svc_type in _EXTERNAL_TYPES:
            spec["externalTrafficPolicy"] = svc_opts.external_traffic_policy
        if svc_type == "LoadBalancer":
            if svc_opts.load_balancer_class:
                spec["loadBalancerClass"] = svc_opts.load_balancer_class
            if svc_opts.load_balancer_source_ranges:
                spec["loadBalancerSourceRanges"] = list(svc_opts.load_balancer_source_ranges)
        metadata: dict[str, Any] = {
            "name": name,
            "namespace": naming.relay_namespace(relay),
            "labels": {
                **naming.labels(relay, "mx"),
                naming.MX_PRIORITY_LABEL: str(entry.priority),
            },
            "annotations": {
                **svc_opts.annotations,
                naming.MX_HOSTNAME_ANNOTATION: entry.hostname,
            },
        }
        out.append({"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec})
    return out


def pod_mx_labels(relay: dict[str, Any], ordinal: int, zone: str | None) -> dict[str, str | None]:
    """The labels a relay pod needs for the MX Services with spec.mx[].pods:
    "true" where it serves that MX, None (remove) where it does not. A merge
    patch of these onto the pod's labels."""
    return {
        naming.mx_pods_label(e.hostname): "true" if e.pods.serves(ordinal, zone) else None
        for e in naming.mx_entries(relay)
        if e.pods is not None
    }
