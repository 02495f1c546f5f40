"""Manifests -> the relay's configuration files. One renderer for everyone.

The operator writes these files into ConfigMaps, `mailrelay render` prints
them, and `mailrelay run` writes them to a folder and starts the relay on it.
Pure functions: objects in, files and verdicts out.

Files:
- relay.json    the MailRelay's policy (spec with defaults), reloadable live
- domains.json   the accepted domains with their next hops, reloadable live;
                 a large install (over shards.DOMAINS_INLINE_MAX) gets
                 domains-index.json instead, naming the domain shards
                 domains-NNNN-of-NNNN.json.gz (gzip'd JSON lists of the same
                 entries) next to the recipient shards (shards.py)
- recipients-NNNN-of-NNNN.txt.gz  the merged recipient tables of `listed`
                 domains, one lowercased address a line, sorted, gzip, each
                 shard small enough for one ConfigMap; an address's shard is a
                 stable hash of it (shards.py), so one new address changes one
                 shard; the name carries the shard count, so a relay never
                 reads shards of one count as a set of another
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api import shards as sharding
from mailrelay_api.claims import Claim, ClusterNetworks, award, claims_of
from mailrelay_api.domain_facts import DomainFacts, facts
from mailrelay_api.load import Inventory
from mailrelay_api.schema import POD_SCHEDULING, name_of, namespace_of
from mailrelay_api.shards import (
    RECIPIENT_LIST_ADVISE_BYTES,
    ListPart,
    RenderCache,
    list_part,
    render_domain_shards,
    render_shards,
)
from mailrelay_api.spec import NextHopSpec, relay_spec
from mailrelay_api.validate import list_size_advice, unused_list_note
from mailrelay_api.verdicts import DomainVerdict, DomainVerdicts

CONFIG_FORMAT = 1
RELAY_FILE = "relay.json"
DOMAINS_FILE = "domains.json"
DOMAINS_INDEX_FILE = "domains-index.json"  # instead of domains.json when sharded
# MailRelay spec keys for the operator and the pods, not the relay's policy:
# changing them must not touch relay.json.
NOT_POLICY = ("replicas", "storage", "image", "allowedNextHops", *POD_SCHEDULING)


@dataclass
class RecipientListVerdict:
    namespace: str
    name: str
    accepted: bool
    reason: str  # Accepted | DomainNotFound | DomainNotAccepted | ForeignAddresses
    message: str
    addresses: int = 0


@dataclass
class Rendered:
    """What one MailRelay renders to."""

    namespace: str
    name: str
    files: dict[str, bytes]
    domains: Sequence[DomainVerdict] = field(default_factory=DomainVerdicts)
    recipient_lists: list[RecipientListVerdict] = field(default_factory=list)
    recipients: int = 0
    claims: list[Claim] = field(default_factory=list)  # MailRelay status.domains
    # of the accepted domains, each once (the NetworkPolicy wants ports and hosts)
    next_hops: list[NextHopSpec] = field(default_factory=list)

    @property
    def config_hash(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name] + b"\0")
        return h.hexdigest()[:16]

    @property
    def accepted_domains(self) -> int:
        return sum(1 for d in self.domains if d.accepted)


def _age_key(obj: dict[str, Any], index: int) -> tuple[str, int, str, str]:
    # Orders first claims on a free domain (never against a recorded holder);
    # offline objects have no timestamp and keep their file order.
    ts = str(obj["metadata"].get("creationTimestamp") or "")
    return (ts or "9999", index, namespace_of(obj), name_of(obj))


@dataclass(frozen=True)
class RenderSettings:
    """What the render needs beyond the manifests (the operator's settings)."""

    cluster: ClusterNetworks = field(default_factory=ClusterNetworks)
    now: datetime.datetime | None = None  # None: the clock


def attach_domains(
    relay: dict[str, Any],
    inv: Inventory,
    settings: RenderSettings | None = None,
    cache: RenderCache | None = None,
    claims: Iterable[Claim] | None = None,
) -> tuple[list[DomainFacts], DomainVerdicts, list[Claim]]:
    """The RelayDomains attached to a relay, a verdict each, and the claims to record.

    Policy first (grants, next hops), then the sticky claims (claims.award) of
    `claims` (one a domain), or of the relay's status when None; age only
    orders first claims on a free domain."""
    settings = settings or RenderSettings()
    now = settings.now or datetime.datetime.now(datetime.UTC)
    spec = relay_spec(relay)
    # By domain, as a render makes them (then this sort is one pass), walked
    # beside the claimed domains: no dict of every claim and no set of both.
    previous = sorted(claims_of(relay).values() if claims is None else claims, key=_domain)
    verdicts = DomainVerdicts()
    # A domain's claimants: most domains have one, held as itself (a list
    # each would be ~90 bytes a RelayDomain during the render).
    by_domain: dict[str, DomainFacts | list[DomainFacts]] = {}
    # A stable sort: inventory order among equal timestamps.
    for f in sorted(facts(relay, spec, inv, settings.cluster, cache), key=_created):
        if f.refused is not None:
            verdicts.append(
                DomainVerdict(f.namespace, f.name, f.domain, False, *f.refused, source=f.source)
            )
        else:
            held = by_domain.get(f.domain)
            if held is None:
                by_domain[f.domain] = f
            elif isinstance(held, list):
                held.append(f)
            else:
                by_domain[f.domain] = [held, f]

    accepted: list[DomainFacts] = []
    claimed: list[Claim] = []
    release_after = spec.allowed_domains.release_after
    for domain, claim in _with_claims(sorted(by_domain), previous):
        held = by_domain.get(domain)
        doms = [] if held is None else held if isinstance(held, list) else [held]
        keys = [f.source for f in doms]
        won = award(domain, keys, claim, release_after, now)
        if won.claim is not None:
            claimed.append(won.claim)
        for key, f in zip(keys, doms, strict=True):
            if key == won.winner:
                # The claim's string, held once: a claim read from the status
                # (or claims_store) has its own, the facts are kept as long.
                f.source = won.winner
                # The accepted verdicts in `accepted`'s order: _lists_and_order pairs them.
                accepted.append(f)
                verdicts.accept(f)  # its DomainVerdict (domain: f.domain) when read
            else:
                # Never who holds it: that is another tenant's business.
                until = f" (until {won.held_until} at the latest)" if won.held_until else ""
                verdicts.append(
                    DomainVerdict(
                        f.namespace,
                        f.name,
                        domain,
                        False,
                        "Conflict",
                        f"{domain} is held by another RelayDomain on this relay{until}",
                        source=f.source,
                    )
                )
    return accepted, verdicts, claimed


def _created(f: DomainFacts) -> str:
    return f.created


def _domain(c: Claim) -> str:
    return c.domain


def _with_claims(domains: list[str], claims: list[Claim]) -> Iterator[tuple[str, Claim | None]]:
    """Every domain of `domains` or `claims` (both sorted, one claim a domain)
    in order, with its claim or None."""
    i = 0
    for c in claims:
        while i < len(domains) and domains[i] < c.domain:
            yield domains[i], None
            i += 1
        if i < len(domains) and domains[i] == c.domain:
            yield domains[i], c
            i += 1
        else:
            yield c.domain, c
    for domain in domains[i:]:
        yield domain, None


def _list_key(rl: Mapping[str, Any], domain: str) -> str | None:
    """What identifies a RecipientList's addresses in the API server: uid and
    generation (which moves with every spec change); offline objects have none."""
    meta = rl["metadata"]
    uid, generation = meta.get("uid"), meta.get("generation")
    if not uid or generation is None:
        return None
    return f"{uid}/{generation}/{domain}"


def _list_part(rl: Mapping[str, Any], domain: str, cache: RenderCache | None) -> ListPart:
    key = _list_key(rl, domain)
    if cache is not None and key is not None and key in cache.lists:
        return cache.lists[key]
    return list_part(key, rl["spec"]["addresses"], domain)


def render_relay(
    relay: dict[str, Any],
    inv: Inventory,
    cache: RenderCache | None = None,
    settings: RenderSettings | None = None,
    claims: Iterable[Claim] | None = None,
) -> Rendered:
    """The configuration files of one MailRelay, and the verdicts behind them.

    With a cache (the operator keeps one per relay), the facts of unchanged
    RelayDomains, unchanged RecipientLists, and recipient and domain shards
    whose contents did not change are reused from the previous render; the
    files are the same as without one. `claims`: the claims to start from
    (the previous render's, one a domain); None: the relay's status.domains.
    """
    attached, verdicts, claimed = attach_domains(relay, inv, settings, cache, claims)
    lists, listed, ordered = _lists_and_order(attached, verdicts, inv, cache)
    shards = render_shards(listed, cache)
    if cache is not None:
        lists.used.update((p.key, p) for p in shards.parts if p.key is not None)
        cache.lists = lists.used
    policy = {k: v for k, v in relay["spec"].items() if k not in NOT_POLICY}
    relay_doc = {
        "format": CONFIG_FORMAT,
        "name": f"{namespace_of(relay)}/{name_of(relay)}",
        "policy": policy,
    }
    files: dict[str, bytes] = {
        RELAY_FILE: _json(relay_doc),
        **_domain_files(ordered, sorted(shards.files), cache),
        **shards.files,
    }
    return Rendered(
        namespace=namespace_of(relay),
        name=name_of(relay),
        files=files,
        domains=verdicts,
        recipient_lists=lists.verdicts,
        recipients=shards.recipients,
        claims=claimed,
        next_hops=list(dict.fromkeys(f.hop for f in attached if f.hop is not None)),
    )


def _lists_and_order(
    attached: list[DomainFacts],
    verdicts: DomainVerdicts,
    inv: Inventory,
    cache: RenderCache | None,
) -> tuple[_Lists, list[ListPart], list[DomainFacts]]:
    """_attach_lists, each listed domain's recipients counted into its verdict,
    and _domains_document; no dict of every verdict by key (~5 MiB at 100,000
    RelayDomains): attach_domains made the accepted verdicts in `attached`'s order."""
    lists = _attach_lists(attached, inv, verdicts, cache)
    for f, (i, held) in zip(attached, verdicts.accepted_facts(), strict=True):
        assert held is f
        if f.spec["recipients"] == "listed":
            verdicts.set_recipients(i, _distinct(lists.per_domain.get(f.source, [])))
    listed, ordered = _domains_document(attached, lists.per_domain)
    return lists, listed, ordered


@dataclass
class _Lists:
    """The RecipientLists of a render: per attached domain, reused parts, verdicts."""

    per_domain: dict[str, list[ListPart]]  # by the domain's namespace/name
    used: dict[str, ListPart]  # cache key -> part, for the next render
    verdicts: list[RecipientListVerdict]


def _attach_lists(
    attached: list[DomainFacts],
    inv: Inventory,
    verdicts: DomainVerdicts,
    cache: RenderCache | None,
) -> _Lists:
    """Each RecipientList to its attached domain, or a verdict saying why not."""
    by_key = {f.source: f for f in attached}
    lists = _Lists({}, {}, [])
    all_domains: set[str] | None = None  # built when first needed
    refused: dict[str, DomainVerdict] | None = None  # the same
    for rl in inv.recipient_lists:
        ns, ref = namespace_of(rl), str(rl["spec"]["domainRef"]["name"])
        key = f"{ns}/{ref}"
        dom = by_key.get(key)
        if dom is None:
            if refused is None:
                refused = {v.key: v for v in verdicts.held() if not v.accepted}
            v = refused.get(key)
            if v is not None:
                lists.verdicts.append(
                    RecipientListVerdict(
                        namespace_of(rl),
                        name_of(rl),
                        False,
                        "DomainNotAccepted",
                        f"RelayDomain {ref} is not accepted: {v.reason}",
                    )
                )
                continue
            # It belongs to another relay's domain, or to none at all.
            if all_domains is None:
                all_domains = {f"{namespace_of(d)}/{name_of(d)}" for d in inv.domains}
            if key not in all_domains:
                lists.verdicts.append(
                    RecipientListVerdict(
                        namespace_of(rl),
                        name_of(rl),
                        False,
                        "DomainNotFound",
                        f"no RelayDomain {ref} in namespace {ns}",
                    )
                )
            continue
        part = _list_part(rl, dom.domain, cache)
        if part.key is not None:
            lists.used[part.key] = part
        lists.per_domain.setdefault(key, []).append(part)
        lists.verdicts.append(_accepted_list(rl, dom, part))
    return lists


def _accepted_list(rl: Mapping[str, Any], dom: DomainFacts, part: ListPart) -> RecipientListVerdict:
    """An attached list's verdict; its message has the warnings `mailrelay validate` gives."""
    unused = unused_list_note({"metadata": {"name": dom.name}, "spec": dom.spec})
    foreign = 0 if unused else part.foreign  # no address of it is used anyway
    notes = [unused] if unused else []
    if foreign:
        notes.append(f"{foreign} address(es) not in {dom.domain} ignored")
    if part.listed_bytes > RECIPIENT_LIST_ADVISE_BYTES:
        notes.append(list_size_advice(part.listed_bytes))
    return RecipientListVerdict(
        namespace_of(rl),
        name_of(rl),
        True,
        "ForeignAddresses" if foreign else "Accepted",
        "; ".join(notes),
        part.in_domain,
    )


def _domains_document(
    attached: list[DomainFacts], per_domain: dict[str, list[ListPart]]
) -> tuple[list[ListPart], list[DomainFacts]]:
    """The parts of the listed domains, and the attached domains in
    domains.json's order (by domain)."""
    listed: list[ListPart] = []
    ordered = sorted(attached, key=_order)
    for f in ordered:
        if f.spec["recipients"] == "listed":
            listed.extend(per_domain.get(f.source, ()))
    return listed, ordered


def _order(f: DomainFacts) -> str:
    return f.order


def _distinct(parts: list[ListPart]) -> int:
    """Addresses of a domain's lists, each counted once."""
    if len(parts) == 1:
        return parts[0].distinct
    return len({a for p in parts for a in p.addresses()})


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _domain_files(
    domains: list[DomainFacts], recipient_files: list[str], cache: RenderCache | None
) -> dict[str, bytes]:
    """domains.json with the domains in it; for a large install, domains-index.json
    naming the domain shards, and the shards (each fits a ConfigMap).

    Old relays read domains.json only: with the index they find no domains.json,
    keep the configuration they have and wait for their new image."""
    size = _domains_doc_size(domains, recipient_files)
    if size <= sharding.DOMAINS_INLINE_MAX:
        entries = [f.entry() for f in domains]
        doc = {"format": CONFIG_FORMAT, "domains": entries, "recipientFiles": recipient_files}
        return {DOMAINS_FILE: _domains_json(doc, cache)}
    shards = render_domain_shards(domains, size, cache)
    if cache is not None:
        cache.domains_json = None
    index = {
        "format": CONFIG_FORMAT,
        "domainFiles": sorted(shards),
        "recipientFiles": recipient_files,
    }
    return {DOMAINS_INDEX_FILE: _json(index), **shards}


def _domains_doc_size(domains: list[DomainFacts], recipient_files: list[str]) -> int:
    """len(json.dumps(domains.json's document, sort_keys=True)), from each
    entry's size: what decides inline or sharded, and the shard count."""
    entries = sum(f.doc_bytes for f in domains) + 2 * max(len(domains) - 1, 0)
    head = '{"domains": ['
    tail = f'], "format": {CONFIG_FORMAT}, "recipientFiles": {json.dumps(recipient_files)}}}'
    return len(head) + entries + len(tail)


def _domains_json(doc: dict[str, Any], cache: RenderCache | None) -> bytes:
    # Indented JSON takes the pure-Python encoder (~0.2 s for 10,000 domains);
    # the compact C-encoded form tells whether the last one can be reused.
    if cache is None:
        return _json(doc)
    compact = json.dumps(doc, sort_keys=True)
    if cache.domains_json is None or cache.domains_json[0] != compact:
        cache.domains_json = (compact, _json(doc))
    return cache.domains_json[1]
