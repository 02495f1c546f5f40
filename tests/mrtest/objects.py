"""Manifest objects for tests: a MailRelay and its RelayDomains as a user
writes them (`*_manifest`, for an API server or `mailrelay render`), and
with the schema's defaults filled in, as the renderer and the operator see
them (mailrelay(), relay_domain())."""

from __future__ import annotations

from typing import Any

from mailrelay_api.schema import API_VERSION
from mailrelay_api.validate import with_defaults


def relay_spec_for_tests(
    hostname: str = "mx.relay.test", nameserver: str | None = None
) -> dict[str, Any]:
    """A MailRelay spec for tests: no DNS-based checks, no pregreet wait."""
    return {
        "hostname": hostname,
        "replicas": 1,
        "postscreen": {"greet": {"action": "ignore", "wait": "0s"}, "dnsbl": {"sites": []}},
        "restrictions": {
            "rejectUnknownRecipientDomain": False,
            "rejectUnknownReverseClientHostname": False,
            "rblClients": [],
            "spf": {"enabled": False},
        },
        # Never the system resolver: a port on loopback nobody answers.
        "dns": {"nameservers": [nameserver or "127.0.0.1:9"], "timeout": "1s"},
        "queue": {"minBackoff": "1s", "maxBackoff": "2s"},
    }


def namespace_manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def mailrelay_manifest(
    name: str = "edge",
    namespace: str = "mail",
    *,
    spec: dict[str, Any] | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    """`spec` replaces the default one (hostname mx.example.net) whole."""
    return {
        "apiVersion": API_VERSION,
        "kind": "MailRelay",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": spec if spec is not None else {"hostname": "mx.example.net"},
    }


def mailrelay(name: str = "edge", namespace: str = "mail", **fields: Any) -> dict[str, Any]:
    """mailrelay_manifest (the same arguments) with the schema's defaults."""
    return with_defaults(mailrelay_manifest(name, namespace, **fields))


def relay_domain_manifest(
    name: str,
    *,
    domain: str | None = None,
    relay: str = "edge",
    relay_namespace: str | None = None,
    namespace: str = "mail",
    next_hop: str | dict[str, Any] = "mail.example.net",
    recipients: str | None = "any",
    **metadata: Any,
) -> dict[str, Any]:
    """RelayDomain name for `domain` (default: the domain name.example);
    `relay_namespace`: the relay's when it is not the domain's; `next_hop`:
    a host, or the whole nextHop; `recipients` None: not given."""
    ref = {"name": relay} | ({"namespace": relay_namespace} if relay_namespace else {})
    spec: dict[str, Any] = {
        "domain": domain or f"{name}.example",
        "relayRef": ref,
        "nextHop": {"host": next_hop} if isinstance(next_hop, str) else next_hop,
    }
    if recipients is not None:
        spec["recipients"] = recipients
    return {
        "apiVersion": API_VERSION,
        "kind": "RelayDomain",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": spec,
    }


def recipient_list_manifest(
    name: str, domain: str, addresses: list[str], namespace: str = "mail"
) -> dict[str, Any]:
    """RecipientList `name` of RelayDomain `domain` (its object's name)."""
    return {
        "apiVersion": API_VERSION,
        "kind": "RecipientList",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"domainRef": {"name": domain}, "addresses": addresses},
    }


def relay_domain(name: str, **fields: Any) -> dict[str, Any]:
    """relay_domain_manifest (the same arguments) with the schema's defaults."""
    return with_defaults(relay_domain_manifest(name, **fields))


def relay_and_domain(
    name: str,
    namespace: str,
    *,
    label: str | None = None,
    replicas: int = 1,
    next_hop: tuple[str, int] = ("127.0.0.1", 2526),
    recipients: str | None = None,
    **spec: Any,
) -> list[dict[str, Any]]:
    """What the kube tests apply: MailRelay `name` (relay_spec_for_tests,
    hostname mx.LABEL.example) and RelayDomain LABEL-example for
    LABEL.example (LABEL: the relay's name unless given), to a next hop
    without TLS; `spec` is added to the relay's."""
    label = label or name
    relay_spec = relay_spec_for_tests(hostname=f"mx.{label}.example")
    relay_spec.update(replicas=replicas, **spec)
    hop = {"host": next_hop[0], "port": next_hop[1], "tls": "none"}
    return [
        mailrelay_manifest(name, namespace, spec=relay_spec),
        relay_domain_manifest(
            f"{label}-example",
            domain=f"{label}.example",
            relay=name,
            namespace=namespace,
            next_hop=hop,
            recipients=recipients,
        ),
    ]
