"""Who may claim which domain on a relay, and where its mail may go (pure).

A RelayDomain is eligible when the MailRelay's policy allows it: a grant for
its namespace matches its domain (spec.allowedDomains), and its next hop is
one the relay allows (spec.allowedNextHops). Among eligible RelayDomains of
one domain, the holder recorded in the MailRelay's status.domains keeps it;
only once the holder has been gone for allowedDomains.releaseAfter may
another take it. Age never decides against a holder: a tenant cannot take a
domain by owning an older object, nor by being there while the owner's
object is deleted and re-applied (Argo CD Replace, a restore, a migration).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mailrelay_api.schema import DEFAULT_NEXT_HOP_PORTS
from mailrelay_api.spec import (
    AllowedDomainsSpec,
    AllowedNamespaces,
    MailRelaySpec,
    NextHopRule,
    NextHopSpec,
)
from mailrelay_api.units import parse_duration

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # metav1.Time, as status conditions have it
# The operator's settings for the default next-hop policy (docs/security.md).
CLUSTER_CIDRS_ENV = "MAILRELAY_CLUSTER_CIDRS"  # service and pod ranges, comma-separated
CLUSTER_DOMAIN_ENV = "MAILRELAY_CLUSTER_DOMAIN"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)  # one per domain, 100,000 and more kept
class Claim:
    """One entry of MailRelay status.domains."""

    domain: str
    holder: str  # namespace/name of the RelayDomain
    gone_since: str | None = None  # when the holder was last seen gone

    def to_status(self) -> dict[str, str]:
        out = {"domain": self.domain, "holder": self.holder}
        if self.gone_since:
            out["goneSince"] = self.gone_since
        return out


def claims_of(relay: Mapping[str, Any]) -> dict[str, Claim]:
    """The claims a MailRelay's status records (an older operator wrote a count there)."""
    recorded = (relay.get("status") or {}).get("domains")
    if not isinstance(recorded, list):
        return {}
    return {
        str(c["domain"]): Claim(str(c["domain"]), str(c["holder"]), c.get("goneSince"))
        for c in recorded
        if isinstance(c, dict) and c.get("domain") and c.get("holder")
    }


@dataclass(frozen=True)
class ClusterNetworks:
    """What "inside the cluster" means for the default next-hop policy."""

    cidrs: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    domain: str = DEFAULT_CLUSTER_DOMAIN

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ClusterNetworks:
        raw = env.get(CLUSTER_CIDRS_ENV, "")
        cidrs = tuple(
            ipaddress.ip_network(c.strip(), strict=False) for c in raw.split(",") if c.strip()
        )
        return cls(cidrs, env.get(CLUSTER_DOMAIN_ENV) or DEFAULT_CLUSTER_DOMAIN)


# --- grants ----------------------------------------------------------------------
def namespace_allowed(
    rule: AllowedNamespaces,
    relay_namespace: str,
    namespace: str,
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> bool:
    """A namespaces rule (from: Same | All | Selector), Gateway API style."""
    if rule.from_ == "All":
        return True
    if rule.from_ == "Same":
        return namespace == relay_namespace
    # Selector: the schema's rule makes the selector present.
    return rule.selector is not None and rule.selector.matches(namespace_labels.get(namespace, {}))


def name_matches(pattern: str, name: str) -> bool:
    """ "*" matches everything, "*.suffix" names under suffix (not suffix itself)."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    return name == pattern


def domain_allowed(
    allowed: AllowedDomainsSpec,
    relay_namespace: str,
    namespace: str,
    domain: str,
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> bool:
    """No grants: any domain from allowed.namespaces; else a grant must match."""
    if not allowed.grants:
        return namespace_allowed(allowed.namespaces, relay_namespace, namespace, namespace_labels)
    return any(
        namespace_allowed(g.namespaces, relay_namespace, namespace, namespace_labels)
        and any(name_matches(p, domain) for p in g.domains)
        for g in allowed.grants
    )


# --- next hops -------------------------------------------------------------------
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return ip.is_loopback if ip is not None else host.lower().rstrip(".") == "localhost"


def inside_cluster(host: str, cluster: ClusterNetworks) -> bool:
    ip = _ip(host)
    if ip is not None:
        return (
            ip.is_loopback
            or ip.is_link_local
            or ip.is_unspecified
            or any(ip in net for net in cluster.cidrs)
        )
    name = host.lower().rstrip(".")
    # One label ("postfix"), a Service ("x.ns.svc") or the cluster's own zone.
    return (
        "." not in name
        or name == "localhost"
        or name.endswith(".svc")
        or name == cluster.domain
        or name.endswith("." + cluster.domain)
    )


def _rule_matches(rule: NextHopRule, hop: NextHopSpec) -> bool:
    if hop.port not in rule.ports:
        return False
    ip = _ip(hop.host)
    if rule.cidr is not None:
        return ip is not None and ip in ipaddress.ip_network(rule.cidr, strict=False)
    return ip is None and rule.host is not None and name_matches(rule.host, hop.host)


def next_hop_allowed(
    spec: MailRelaySpec, hop: NextHopSpec, tenant: bool, cluster: ClusterNetworks
) -> bool:
    """spec.allowedNextHops; when empty, tenants (other namespaces) may reach
    only hosts outside the cluster on the mail ports, the relay's own namespace anything."""
    if spec.allowed_next_hops:
        return any(_rule_matches(r, hop) for r in spec.allowed_next_hops)
    if not tenant:
        return True
    return hop.port in DEFAULT_NEXT_HOP_PORTS and not inside_cluster(hop.host, cluster)


# --- sticky claims ---------------------------------------------------------------
def _parse(at: str) -> datetime.datetime:
    return datetime.datetime.strptime(at, TIME_FORMAT).replace(tzinfo=datetime.UTC)


def format_time(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime(TIME_FORMAT)


@dataclass(frozen=True)
class Award:
    """Who gets a domain now, and the claim to record (None: none is kept)."""

    winner: str | None  # namespace/name, or None: nobody (held for a gone holder)
    claim: Claim | None
    held_until: str | None = None  # when a gone holder's claim lapses


def award(
    domain: str,
    eligible: Iterable[str],  # namespace/name of eligible claimants, oldest first
    previous: Claim | None,
    release_after: str,
    now: datetime.datetime,
) -> Award:
    """Sticky: the recorded holder keeps the domain; if it is gone, nobody gets
    it until release_after has passed since it was first seen gone."""
    claimants = list(eligible)
    if previous is not None:
        if previous.holder in claimants:
            # The same claim object when it stays as it was: 100,000 claims a
            # render, most unchanged (claims_store compares them).
            same = previous.gone_since is None and previous.domain == domain
            return Award(previous.holder, previous if same else Claim(domain, previous.holder))
        gone_since = previous.gone_since or format_time(now)
        until = _parse(gone_since) + datetime.timedelta(seconds=parse_duration(release_after))
        if now < until:
            return Award(None, Claim(domain, previous.holder, gone_since), format_time(until))
    if not claimants:
        return Award(None, None)
    return Award(claimants[0], Claim(domain, claimants[0]))


def next_release(claims: Iterable[Claim], release_after: str) -> datetime.datetime | None:
    """When the first gone holder's claim lapses (the operator looks again then)."""
    wait = datetime.timedelta(seconds=parse_duration(release_after))
    times = [_parse(c.gone_since) + wait for c in claims if c.gone_since]
    return min(times) if times else None
