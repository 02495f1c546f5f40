"""Names, labels and fixed paths of everything the operator creates.

Children get explicit names (never generateName) and labels chosen here; the
parent's labels are never copied onto them (Argo CD tracks by label too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from mailrelay_api.schema import GROUP
from mailrelay_api.spec import MxEntrySpec, relay_spec

FIELD_MANAGER = "mailrelay-operator"
MANAGED_BY = "mailrelay-operator"
FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP
RESTART_HASH_ANNOTATION = f"{GROUP}/restart-hash"
# The handover secret the pods read at start: a new one rolls them.
HANDOVER_HASH_ANNOTATION = f"{GROUP}/handover-secret-hash"
MX_PRIORITY_LABEL = f"{GROUP}/mx-priority"
MX_HOSTNAME_ANNOTATION = f"{GROUP}/mx-hostname"
SHARD_LABEL = f"{GROUP}/shard"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"

# Paths and ports inside the relay pod.
CONFIG_DIR = "/etc/mailrelay/config"
QUEUE_DIR = "/var/spool/mailrelay"
TLS_DIR = "/etc/mailrelay/tls"
HANDOVER_DIR = "/etc/mailrelay/handover"
HANDOVER_SECRET_KEY = "secret"
SMTP_PORT = 2525
PROXY_PORT = 10025
METRICS_PORT = 9125  # also /queue and POST /drain (relay.handover.control)
HANDOVER_PORT = 10026  # peer pods hand their queue over here (relay.handover.transfer)
SERVICE_PORT = 25
RELAY_UID = 10025
DEFAULT_RELAY_IMAGE = "ghcr.io/mailrelay/mailrelay:0.1.0"
RELAY_IMAGE_ENV = "MAILRELAY_RELAY_IMAGE"


def relay_name(relay: dict[str, Any]) -> str:
    return str(relay["metadata"]["name"])


def relay_namespace(relay: dict[str, Any]) -> str:
    return str(relay["metadata"].get("namespace") or "default")


def labels(relay: dict[str, Any], component: str) -> dict[str, str]:
    """The labels every child of a relay carries."""
    return {
        LABEL_NAME: "mailrelay",
        LABEL_INSTANCE: relay_name(relay),
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def pod_selector(relay: dict[str, Any]) -> dict[str, str]:
    """The StatefulSet's selector: immutable, so it must never change shape."""
    return {
        LABEL_NAME: "mailrelay",
        LABEL_INSTANCE: relay_name(relay),
        LABEL_COMPONENT: "relay",
    }


def children_selector(relay: dict[str, Any], component: str | None = None) -> str:
    """A label selector string matching this relay's children (of one component)."""
    parts = [
        f"{LABEL_NAME}=mailrelay",
        f"{LABEL_INSTANCE}={relay_name(relay)}",
        f"{LABEL_MANAGED_BY}={MANAGED_BY}",
    ]
    if component:
        parts.append(f"{LABEL_COMPONENT}={component}")
    return ",".join(parts)


def config_map_name(relay: dict[str, Any]) -> str:
    return f"{relay_name(relay)}-config"


def recipients_config_map_name(relay: dict[str, Any], shard: int) -> str:
    return f"{relay_name(relay)}-recipients-{shard}"


def domains_config_map_name(relay: dict[str, Any], shard: int) -> str:
    return f"{relay_name(relay)}-domains-{shard}"


def statefulset_name(relay: dict[str, Any]) -> str:
    return relay_name(relay)


def headless_service_name(relay: dict[str, Any]) -> str:
    return f"{relay_name(relay)}-pods"


def pdb_name(relay: dict[str, Any]) -> str:
    return relay_name(relay)


def network_policy_name(relay: dict[str, Any]) -> str:
    return relay_name(relay)


def handover_secret_name(relay: dict[str, Any]) -> str:
    return f"{relay_name(relay)}-handover"


def pod_name(relay: dict[str, Any], ordinal: int) -> str:
    return f"{statefulset_name(relay)}-{ordinal}"


def pod_host(relay: dict[str, Any], ordinal: int) -> str:
    """The pod's DNS name through the headless Service (it publishes pods
    that are not ready too: a draining pod must stay reachable)."""
    return f"{pod_name(relay, ordinal)}.{headless_service_name(relay)}.{relay_namespace(relay)}.svc"


def certificate_name(relay: dict[str, Any]) -> str:
    return f"{relay_name(relay)}-tls"


def tls_secret_name(relay: dict[str, Any]) -> str:
    return relay_spec(relay).tls.secret_name or f"{relay_name(relay)}-tls"


def mx_entries(relay: dict[str, Any]) -> tuple[MxEntrySpec, ...]:
    """spec.mx, or one entry from spec.hostname when it is empty (MailRelaySpec.mx_entries)."""
    return relay_spec(relay).mx_entries()


def mx_service_name(relay: dict[str, Any], hostname: str) -> str:
    """`<relay>-<hostname, dots as dashes>`: named by what it serves, so a new
    priority keeps the Service (and its load-balancer IP). A name over 63
    characters (a Service name is a DNS label) ends in a hash of the hostname."""
    name = f"{relay_name(relay)}-{hostname.lower().rstrip('.').replace('.', '-')}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(hostname.lower().encode()).hexdigest()[:10]
    return f"{name[:52].rstrip('-')}-{digest}"


MX_PODS_LABEL_PREFIX = f"{GROUP}/mx-"


def mx_pods_label(hostname: str) -> str:
    """The pod label an MX Service with spec.mx[].pods selects (the operator
    sets it on the pods that serve that MX; a hash: label names are short)."""
    return f"{MX_PODS_LABEL_PREFIX}{hashlib.sha256(hostname.lower().encode()).hexdigest()[:10]}"


def mx_service_names(relay: dict[str, Any], kept: Mapping[str, str] | None = None) -> list[str]:
    """One Service name per MX entry. kept: hostname -> the name of a Service
    this relay already has for it (MX_HOSTNAME_ANNOTATION), which stays: an
    upgrade from `<relay>-mx<priority>` names keeps each Service and its IP."""
    kept = kept or {}
    return [
        kept.get(e.hostname.lower()) or mx_service_name(relay, e.hostname)
        for e in mx_entries(relay)
    ]
