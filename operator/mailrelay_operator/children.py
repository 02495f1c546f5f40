"""Everything one MailRelay owns, as desired-state dicts (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import kopf

from mailrelay_api.render import Rendered
from mailrelay_operator import (
    certificate,
    claims_store,
    configmaps,
    networkpolicy,
    pdb,
    services,
    statefulset,
)
from mailrelay_operator import handover_secret as handover
from mailrelay_operator.settings import NetworkSettings


def owned(child: dict[str, Any], relay: dict[str, Any]) -> dict[str, Any]:
    """Adds the relay as controller owner; never copies the relay's labels (unlike kopf.adopt)."""
    kopf.append_owner_reference(child, owner=cast(Any, relay))
    return child


def desired_children(
    relay: dict[str, Any],
    rendered: Rendered,
    image: str,
    cert_manager: bool,
    handover_key: str | None = None,
    network: NetworkSettings | None = None,
    kept_mx: Mapping[str, str] | None = None,
    claims_cache: claims_store.ClaimsCache | None = None,
    encode_later: bool = False,
) -> list[dict[str, Any]]:
    """The children in apply order: configuration first, then the pods that read it.

    handover_key: the relay's handover Secret is among them (the reconciler
    always has one; the golden tests leave it out, it is random).
    network: the NetworkPolicy is among them unless its settings turn it off.
    kept_mx: hostname -> name of an MX Service the relay already has (naming.mx_service_names).
    claims_cache: the relay's claims shards of the last pass (the reconciler keeps it).
    encode_later: shards' binaryData as configmaps.Base64, which ChildApplier.apply
    encodes one child at a time (configmaps.encoded), not all of them here.
    """
    tls = certificate.wants_tls(relay) and (
        cert_manager or not certificate.wants_certificate(relay)
    )
    shards = configmaps.recipient_config_maps(relay, rendered, encode_later)
    domain_shards = configmaps.domain_config_maps(relay, rendered, encode_later)
    # Domain shards before the index that names them (config): a pod rarely
    # sees an index whose shards are not there yet (it would keep its config).
    children = [*domain_shards, configmaps.config_config_map(relay, rendered), *shards]
    children += claims_store.claims_config_maps(relay, rendered.claims, claims_cache, encode_later)
    if certificate.wants_certificate(relay) and cert_manager:
        children.append(certificate.certificate(relay))
    if handover_key:
        children.append(handover.handover_secret(relay, handover_key))
    opts = statefulset.PodOptions(
        image=image,
        shards=len(shards),
        domain_shards=len(domain_shards),
        tls=tls,
        handover_hash=handover.key_hash(handover_key) if handover_key else "",
    )
    children += [
        services.headless_service(relay),
        statefulset.statefulset(relay, opts),
        *services.mx_services(relay, kept_mx),
        pdb.pod_disruption_budget(relay),
    ]
    if network is not None and network.network_policy:
        children.append(networkpolicy.network_policy(relay, rendered.next_hops, network))
    return [owned(c, relay) for c in children]
