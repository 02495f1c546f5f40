"""What `mailrelay validate` reports beyond the schema: references between the
manifests (a RelayDomain's MailRelay, a RecipientList's RelayDomain) and the
domains a render does not accept (a claim another namespace holds, a grant
that does not cover it)."""

from __future__ import annotations

from mailrelay_api.load import Inventory
from mailrelay_api.render import render_relay
from mailrelay_api.schema import name_of, namespace_of


def cross_reference_errors(inv: Inventory) -> list[str]:
    """Problems `mailrelay validate` reports beyond the schema."""
    problems: list[str] = []
    relays = {(namespace_of(r), name_of(r)) for r in inv.relays}
    for dom in inv.domains:
        ref = dom["spec"]["relayRef"]
        target = (ref.get("namespace") or namespace_of(dom), ref["name"])
        if target not in relays:
            problems.append(
                f"RelayDomain {namespace_of(dom)}/{name_of(dom)}: spec.relayRef: no MailRelay "
                f"{target[0]}/{target[1]} in the manifests"
            )
    for relay in inv.relays:
        for v in render_relay(relay, inv).domains:
            if not v.accepted:
                problems.append(
                    f"RelayDomain {v.namespace}/{v.name}: not accepted by MailRelay "
                    f"{namespace_of(relay)}/{name_of(relay)}: {v.reason}: {v.message}"
                )
    domains = {(namespace_of(d), name_of(d)) for d in inv.domains}
    for rl in inv.recipient_lists:
        key = (namespace_of(rl), str(rl["spec"]["domainRef"]["name"]))
        if key not in domains:
            problems.append(
                f"RecipientList {namespace_of(rl)}/{name_of(rl)}: spec.domainRef: no RelayDomain "
                f"{key[1]} in namespace {key[0]}"
            )
    return problems
