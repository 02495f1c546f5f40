"""Manifest objects for unit tests: a MailRelay and its RelayDomains with the
schema's defaults filled in, as the renderer and the operator see them."""

from __future__ import annotations

from typing import Any

from mailrelay_api.schema import API_VERSION
from mailrelay_api.validate import with_defaults


def mailrelay(name: str = "edge", namespace: str = "mail", **metadata: Any) -> dict[str, Any]:
    return with_defaults(
        {
            "apiVersion": API_VERSION,
            "kind": "MailRelay",
            "metadata": {"name": name, "namespace": namespace, **metadata},
            "spec": {"hostname": "mx.example.net"},
        }
    )


def relay_domain(
    name: str,
    *,
    relay: str = "edge",
    namespace: str = "mail",
    next_hop: str = "mail.example.net",
    recipients: str = "any",
    **metadata: Any,
) -> dict[str, Any]:
    """RelayDomain name for the domain name.example."""
    return with_defaults(
        {
            "apiVersion": API_VERSION,
            "kind": "RelayDomain",
            "metadata": {"name": name, "namespace": namespace, **metadata},
            "spec": {
                "domain": f"{name}.example",
                "relayRef": {"name": relay},
                "nextHop": {"host": next_hop},
                "recipients": recipients,
            },
        }
    )
