"""The cert-manager Certificate for the relay's MX host names (pure builder)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mailrelay_api.spec import relay_spec
from mailrelay_operator import naming

CERT_MANAGER_GROUP = "cert-manager.io"
CERT_MANAGER_API = f"{CERT_MANAGER_GROUP}/v1"
CERTIFICATE_CRD = f"certificates.{CERT_MANAGER_GROUP}"


def wants_certificate(relay: dict[str, Any]) -> bool:
    return relay_spec(relay).tls.issuer_ref is not None


def wants_tls(relay: dict[str, Any]) -> bool:
    """A Certificate is asked for, or an existing Secret is named."""
    tls = relay_spec(relay).tls
    return tls.issuer_ref is not None or bool(tls.secret_name)


def dns_names(relay: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for host in [e.hostname for e in naming.mx_entries(relay)] + [relay_spec(relay).hostname]:
        host = host.lower().rstrip(".")
        if host not in names:
            names.append(host)
    return names


def certificate(relay: dict[str, Any]) -> dict[str, Any]:
    issuer = relay_spec(relay).tls.issuer_ref
    if issuer is None:
        raise ValueError("certificate() is for a relay that wants_certificate()")
    return {
        "apiVersion": CERT_MANAGER_API,
        "kind": "Certificate",
        "metadata": {
            "name": naming.certificate_name(relay),
            "namespace": naming.relay_namespace(relay),
            "labels": naming.labels(relay, "tls"),
        },
        "spec": {
            "secretName": naming.tls_secret_name(relay),
            "dnsNames": dns_names(relay),
            "issuerRef": {
                "name": issuer.name,
                "kind": issuer.kind,
                "group": issuer.group,
            },
            "privateKey": {"rotationPolicy": "Always"},
            "usages": ["server auth", "digital signature", "key encipherment"],
        },
    }


def certificate_ready(cert: Mapping[str, Any] | None) -> tuple[bool, str]:
    """Whether cert-manager has issued the Certificate (its Ready condition),
    and what to say: TLS=True only then (the pods serve STARTTLS from its Secret)."""
    if cert is None:
        return False, "Certificate not created yet"
    name = cert.get("metadata", {}).get("name", "")
    for c in (cert.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            word = f"{c.get('reason') or c.get('status')}"
            if c.get("message"):
                word += f": {c['message']}"
            return c.get("status") == "True", f"Certificate {name}: {word}"
    return False, f"Certificate {name}: Issuing"
