"""What a render needs of each RelayDomain of a relay, worked out once per spec.

The operator's RenderCache keeps the facts of the last render's domains in its
inventory order (the input cache's, sorted by namespace and name): the next
render walks its own inventory alongside them, so an unchanged domain (the
same spec dict: the input cache replaces a changed one, never changes it)
costs a comparison, and the cache holds no dict and no key per domain.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mailrelay_api.claims import ClusterNetworks, domain_allowed, next_hop_allowed
from mailrelay_api.load import Inventory
from mailrelay_api.schema import name_of, namespace_of
from mailrelay_api.spec import MailRelaySpec, NextHopSpec

if TYPE_CHECKING:
    from mailrelay_api.shards import RenderCache


def refers_to(domain: Mapping[str, Any], relay: dict[str, Any]) -> bool:
    ref = domain["spec"]["relayRef"]
    return ref["name"] == name_of(relay) and (
        ref.get("namespace") or namespace_of(domain)
    ) == namespace_of(relay)


class DomainFacts:
    """What a render needs of one RelayDomain that refers to the relay; the
    cache keeps them between renders, so a render of 100,000 domains redoes
    none of this for the unchanged ones. Its strings are the cached object's
    own (the input cache interns the namespace, the timestamp and the spec's
    short strings), but for `source`, which a claim holds too (one string)."""

    __slots__ = (
        "created",
        "doc_bytes",
        "domain",
        "hop",
        "name",
        "namespace",
        "refused",
        "source",
        "spec",
    )

    def __init__(self, dom: Mapping[str, Any]) -> None:
        spec = dom["spec"]
        self.spec: Mapping[str, Any] = spec
        self.namespace, self.name = namespace_of(dom), name_of(dom)
        self.source = f"{self.namespace}/{self.name}"  # domains.json's "source"
        written = str(spec["domain"])
        low = _same_or(written, written.lower())
        self.domain = _same_or(low, low.rstrip("."))
        # Orders first claims on a free domain (never against a recorded
        # holder); offline objects have no timestamp and keep their file order.
        self.created = str(dom["metadata"].get("creationTimestamp") or "") or "9999"
        self.hop: NextHopSpec | None = None
        self.doc_bytes = 0  # its domains.json entry's size (compact JSON)
        self.refused: tuple[str, str] | None = None  # policy_verdict

    @property
    def order(self) -> str:
        """domains.json's sort key: the domain lowercased, trailing dot and all
        (without one, lowercasing adds none: the domain itself)."""
        written = str(self.spec["domain"])
        return written.lower() if written.endswith(".") else self.domain

    def entry(self) -> dict[str, Any]:
        """Its entry in domains.json (or a domain shard)."""
        spec = self.spec
        out = {
            "domain": self.domain,
            "nextHop": spec["nextHop"],
            "recipients": spec["recipients"],
            "source": self.source,
        }
        if spec["recipients"] == "verify":
            out["verify"] = spec.get("verify", {})
        return out


def _same_or(old: str, new: str) -> str:
    """`old` when equal: one string object, not two."""
    return old if new == old else new


def policy_verdict(
    relay: dict[str, Any],
    spec: MailRelaySpec,
    dom: DomainFacts,
    hop: NextHopSpec,
    inv: Inventory,
    cluster: ClusterNetworks,
) -> tuple[str, str] | None:
    """Why a RelayDomain may not attach at all, (reason, message) (None: it may);
    names only its own relay.

    `spec` is relay_spec(relay), typed once per render (not once per domain)."""
    domain, ns = dom.domain, dom.namespace
    where = f"MailRelay {namespace_of(relay)}/{name_of(relay)}"
    if not domain_allowed(
        spec.allowed_domains, namespace_of(relay), ns, domain, inv.namespace_labels
    ):
        return ("NotAllowed", f"{where} grants namespace {ns} no claim on {domain}")
    if not next_hop_allowed(spec, hop, tenant=ns != namespace_of(relay), cluster=cluster):
        return (
            "NextHopNotAllowed",
            f"{where} does not allow next hop {hop.host}:{hop.port} (spec.allowedNextHops)",
        )
    return None


def _policy_key(relay: dict[str, Any], inv: Inventory, cluster: ClusterNetworks) -> str:
    """What the facts of a relay's domains depend on beyond the domains themselves."""
    return json.dumps(
        [namespace_of(relay), name_of(relay), relay["spec"], inv.namespace_labels, repr(cluster)],
        sort_keys=True,
        default=str,
    )


class _Known:
    """The last render's facts, in its inventory order, found again by walking
    alongside this render's inventory: the operator's is sorted by namespace
    and name, so a domain added or removed since costs a step, not a miss of
    every domain after it. In another order a domain's facts may not be found
    (made again): slower, never wrong."""

    def __init__(self, facts: list[DomainFacts]) -> None:
        self.facts, self.at = facts, 0

    def find(self, dom: Mapping[str, Any], ns: str) -> DomainFacts | None:
        """The facts made from this very spec, of this namespace and name."""
        facts, spec, name = self.facts, dom["spec"], name_of(dom)
        while self.at < len(facts):
            f = facts[self.at]
            if f.name == name and f.namespace == ns:
                self.at += 1
                return f if f.spec is spec else None
            if (f.namespace, f.name) > (ns, name):
                return None  # an added domain: f comes later
            self.at += 1  # f's domain is gone
        return None


def facts(
    relay: dict[str, Any],
    spec: MailRelaySpec,
    inv: Inventory,
    cluster: ClusterNetworks,
    cache: RenderCache | None,
) -> list[DomainFacts]:
    """The facts of the RelayDomains that refer to the relay (inventory order);
    from the cache for every domain whose spec it has seen."""
    key = _policy_key(relay, inv, cluster)
    known = _Known(cache.domain_facts if cache is not None and cache.domain_policy == key else [])
    hops: dict[NextHopSpec, NextHopSpec] = {}  # equal next hops held once
    if cache is not None:
        hops = cache.next_hops if known.facts else {}
        cache.next_hops = hops
    out: list[DomainFacts] = []
    relay_ns, relay_name = namespace_of(relay), name_of(relay)
    for dom in inv.domains:
        ref = dom["spec"]["relayRef"]  # refers_to, the relay's names read once
        if ref["name"] != relay_name:
            continue
        ns = namespace_of(dom)
        if (ref.get("namespace") or ns) != relay_ns:
            continue
        f = known.find(dom, ns)
        if f is None:
            f = DomainFacts(dom)
            hop = NextHopSpec.from_dict(dom["spec"]["nextHop"])
            hop = f.hop = hops.setdefault(hop, hop)
            f.doc_bytes = len(json.dumps(f.entry(), sort_keys=True))
            f.refused = policy_verdict(relay, spec, f, hop, inv, cluster)
        out.append(f)
    if cache is not None:
        cache.domain_policy, cache.domain_facts = key, out
    return out
