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
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api import shards as sharding
from mailrelay_api.claims import (
    Claim,
    ClusterNetworks,
    award,
    claims_of,
    domain_allowed,
    next_hop_allowed,
)
from mailrelay_api.load import Inventory
from mailrelay_api.schema import POD_SCHEDULING
from mailrelay_api.shards import (
    RECIPIENT_LIST_ADVISE_BYTES,
    ListPart,
    RenderCache,
    list_part,
    render_domain_shards,
    render_shards,
)
from mailrelay_api.spec import MailRelaySpec, NextHopSpec, relay_spec
from mailrelay_api.validate import list_size_advice, unused_list_note

CONFIG_FORMAT = 1
RELAY_FILE = "relay.json"
DOMAINS_FILE = "domains.json"
DOMAINS_INDEX_FILE = "domains-index.json"  # instead of domains.json when sharded
# MailRelay spec keys for the operator and the pods, not the relay's policy:
# changing them must not touch relay.json.
NOT_POLICY = ("replicas", "storage", "image", "allowedNextHops", *POD_SCHEDULING)


@dataclass
class DomainVerdict:
    """Whether a RelayDomain is attached to a relay, and why not."""

    namespace: str
    name: str
    domain: str
    accepted: bool
    # Accepted | Conflict | NotAllowed | NextHopNotAllowed | RelayNotFound | NoRecipients
    reason: str
    message: str
    recipients: int = 0


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
    domains: list[DomainVerdict] = field(default_factory=list)
    recipient_lists: list[RecipientListVerdict] = field(default_factory=list)
    recipients: int = 0
    claims: list[Claim] = field(default_factory=list)  # MailRelay status.domains
    next_hops: list[NextHopSpec] = field(default_factory=list)  # of the accepted domains

    @property
    def config_hash(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + self.files[name] + b"\0")
        return h.hexdigest()[:16]

    @property
    def accepted_domains(self) -> int:
        return sum(1 for d in self.domains if d.accepted)


def _ns(obj: dict[str, Any]) -> str:
    return str(obj["metadata"].get("namespace") or "default")


def _name(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["name"])


def _age_key(obj: dict[str, Any], index: int) -> tuple[str, int, str, str]:
    # Orders first claims on a free domain (never against a recorded holder);
    # offline objects have no timestamp and keep their file order.
    ts = str(obj["metadata"].get("creationTimestamp") or "")
    return (ts or "9999", index, _ns(obj), _name(obj))


def refers_to(domain: dict[str, Any], relay: dict[str, Any]) -> bool:
    ref = domain["spec"]["relayRef"]
    return ref["name"] == _name(relay) and (ref.get("namespace") or _ns(domain)) == _ns(relay)


@dataclass(frozen=True)
class RenderSettings:
    """What the render needs beyond the manifests (the operator's settings)."""

    cluster: ClusterNetworks = field(default_factory=ClusterNetworks)
    now: datetime.datetime | None = None  # None: the clock


def _policy_verdict(
    relay: dict[str, Any],
    spec: MailRelaySpec,
    dom: dict[str, Any],
    inv: Inventory,
    cluster: ClusterNetworks,
) -> DomainVerdict | None:
    """Why a RelayDomain may not attach at all (None: it may); names only its own relay.

    `spec` is relay_spec(relay), typed once per render (not once per domain)."""
    domain = str(dom["spec"]["domain"]).lower().rstrip(".")
    ns = _ns(dom)
    where = f"MailRelay {_ns(relay)}/{_name(relay)}"
    if not domain_allowed(spec.allowed_domains, _ns(relay), ns, domain, inv.namespace_labels):
        return DomainVerdict(
            ns,
            _name(dom),
            domain,
            False,
            "NotAllowed",
            f"{where} grants namespace {ns} no claim on {domain}",
        )
    hop = NextHopSpec.from_dict(dom["spec"]["nextHop"])
    if not next_hop_allowed(spec, hop, tenant=ns != _ns(relay), cluster=cluster):
        return DomainVerdict(
            ns,
            _name(dom),
            domain,
            False,
            "NextHopNotAllowed",
            f"{where} does not allow next hop {hop.host}:{hop.port} (spec.allowedNextHops)",
        )
    return None


def attach_domains(
    relay: dict[str, Any], inv: Inventory, settings: RenderSettings | None = None
) -> tuple[list[dict[str, Any]], list[DomainVerdict], list[Claim]]:
    """The RelayDomains attached to a relay, a verdict each, and the claims to record.

    Policy first (grants, next hops), then the sticky claims of the relay's
    status (claims.award); age only orders first claims on a free domain."""
    settings = settings or RenderSettings()
    now = settings.now or datetime.datetime.now(datetime.UTC)
    spec = relay_spec(relay)
    previous = claims_of(relay)
    verdicts: list[DomainVerdict] = []
    by_domain: dict[str, list[dict[str, Any]]] = {}
    candidates = [(i, d) for i, d in enumerate(inv.domains) if refers_to(d, relay)]
    for _, dom in sorted(candidates, key=lambda c: _age_key(c[1], c[0])):
        refused = _policy_verdict(relay, spec, dom, inv, settings.cluster)
        if refused is not None:
            verdicts.append(refused)
        else:
            by_domain.setdefault(str(dom["spec"]["domain"]).lower().rstrip("."), []).append(dom)

    accepted: list[dict[str, Any]] = []
    claims: list[Claim] = []
    for domain in sorted(set(by_domain) | set(previous)):
        doms = by_domain.get(domain, [])
        keys = [f"{_ns(d)}/{_name(d)}" for d in doms]
        won = award(domain, keys, previous.get(domain), spec.allowed_domains.release_after, now)
        if won.claim is not None:
            claims.append(won.claim)
        for key, dom in zip(keys, doms, strict=True):
            if key == won.winner:
                accepted.append(dom)
                verdicts.append(DomainVerdict(_ns(dom), _name(dom), domain, True, "Accepted", ""))
            else:
                # Never who holds it: that is another tenant's business.
                until = f" (until {won.held_until} at the latest)" if won.held_until else ""
                verdicts.append(
                    DomainVerdict(
                        _ns(dom),
                        _name(dom),
                        domain,
                        False,
                        "Conflict",
                        f"{domain} is held by another RelayDomain on this relay{until}",
                    )
                )
    return accepted, verdicts, claims


def _list_key(rl: dict[str, Any], domain: str) -> str | None:
    """What identifies a RecipientList's addresses in the API server: uid and
    generation (which moves with every spec change); offline objects have none."""
    meta = rl["metadata"]
    uid, generation = meta.get("uid"), meta.get("generation")
    if not uid or generation is None:
        return None
    return f"{uid}/{generation}/{domain}"


def _list_part(rl: dict[str, Any], domain: str, cache: RenderCache | None) -> ListPart:
    key = _list_key(rl, domain)
    if cache is not None and key is not None and key in cache.lists:
        return cache.lists[key]
    return list_part(key, rl["spec"]["addresses"], domain)


def render_relay(
    relay: dict[str, Any],
    inv: Inventory,
    cache: RenderCache | None = None,
    settings: RenderSettings | None = None,
) -> Rendered:
    """The configuration files of one MailRelay, and the verdicts behind them.

    With a cache (the operator keeps one per relay), unchanged RecipientLists
    and recipient shards are reused from the previous render; the files are
    the same as without one.
    """
    attached, verdicts, claims = attach_domains(relay, inv, settings)
    verdict_of = {(v.namespace, v.name): v for v in verdicts}
    lists = _attach_lists(attached, inv, verdict_of, cache)
    listed, domains_doc = _domains_document(attached, verdict_of, lists.per_domain)
    shards = render_shards(listed, cache)
    if cache is not None:
        lists.used.update((p.key, p) for p in shards.parts if p.key is not None)
        cache.lists = lists.used
    policy = {k: v for k, v in relay["spec"].items() if k not in NOT_POLICY}
    relay_doc = {
        "format": CONFIG_FORMAT,
        "name": f"{_ns(relay)}/{_name(relay)}",
        "policy": policy,
    }
    files: dict[str, bytes] = {
        RELAY_FILE: _json(relay_doc),
        **_domain_files(domains_doc, sorted(shards.files), cache),
        **shards.files,
    }
    return Rendered(
        namespace=_ns(relay),
        name=_name(relay),
        files=files,
        domains=verdicts,
        recipient_lists=lists.verdicts,
        recipients=shards.recipients,
        claims=claims,
        next_hops=[NextHopSpec.from_dict(d["spec"]["nextHop"]) for d in attached],
    )


@dataclass
class _Lists:
    """The RecipientLists of a render: per attached domain, reused parts, verdicts."""

    per_domain: dict[tuple[str, str], list[ListPart]]
    used: dict[str, ListPart]  # cache key -> part, for the next render
    verdicts: list[RecipientListVerdict]


def _attach_lists(
    attached: list[dict[str, Any]],
    inv: Inventory,
    verdict_of: dict[tuple[str, str], DomainVerdict],
    cache: RenderCache | None,
) -> _Lists:
    """Each RecipientList to its attached domain, or a verdict saying why not."""
    by_key = {(_ns(d), _name(d)): d for d in attached}
    lists = _Lists({k: [] for k in by_key}, {}, [])
    all_domains: set[tuple[str, str]] | None = None  # built when first needed
    for rl in inv.recipient_lists:
        key = (_ns(rl), str(rl["spec"]["domainRef"]["name"]))
        dom = by_key.get(key)
        if dom is None:
            v = verdict_of.get(key)
            if v is not None:
                lists.verdicts.append(
                    RecipientListVerdict(
                        _ns(rl),
                        _name(rl),
                        False,
                        "DomainNotAccepted",
                        f"RelayDomain {key[1]} is not accepted: {v.reason}",
                    )
                )
                continue
            # It belongs to another relay's domain, or to none at all.
            if all_domains is None:
                all_domains = {(_ns(d), _name(d)) for d in inv.domains}
            if key not in all_domains:
                lists.verdicts.append(
                    RecipientListVerdict(
                        _ns(rl),
                        _name(rl),
                        False,
                        "DomainNotFound",
                        f"no RelayDomain {key[1]} in namespace {key[0]}",
                    )
                )
            continue
        domain = str(dom["spec"]["domain"]).lower().rstrip(".")
        part = _list_part(rl, domain, cache)
        if part.key is not None:
            lists.used[part.key] = part
        lists.per_domain[key].append(part)
        lists.verdicts.append(_accepted_list(rl, dom, domain, part))
    return lists


def _accepted_list(
    rl: dict[str, Any], dom: dict[str, Any], domain: str, part: ListPart
) -> RecipientListVerdict:
    """An attached list's verdict; its message has the warnings `mailrelay validate` gives."""
    unused = unused_list_note(dom)
    foreign = 0 if unused else part.foreign  # no address of it is used anyway
    notes = [unused] if unused else []
    if foreign:
        notes.append(f"{foreign} address(es) not in {domain} ignored")
    if part.listed_bytes > RECIPIENT_LIST_ADVISE_BYTES:
        notes.append(list_size_advice(part.listed_bytes))
    return RecipientListVerdict(
        _ns(rl),
        _name(rl),
        True,
        "ForeignAddresses" if foreign else "Accepted",
        "; ".join(notes),
        part.in_domain,
    )


def _domains_document(
    attached: list[dict[str, Any]],
    verdict_of: dict[tuple[str, str], DomainVerdict],
    per_domain: dict[tuple[str, str], list[ListPart]],
) -> tuple[list[ListPart], list[dict[str, Any]]]:
    """domains.json's entries, sorted by domain, and the parts of the listed ones."""
    listed: list[ListPart] = []
    domains_doc = []
    for dom in sorted(attached, key=lambda d: str(d["spec"]["domain"]).lower()):
        key = (_ns(dom), _name(dom))
        spec = dom["spec"]
        v = verdict_of[key]
        if spec["recipients"] == "listed":
            parts = per_domain[key]
            listed.extend(parts)
            v.recipients = _distinct(parts)
            if not v.recipients:
                v.reason = "NoRecipients"
                v.message = "recipients: listed and no RecipientList: every address is refused"
        entry = {
            "domain": str(spec["domain"]).lower().rstrip("."),
            "nextHop": spec["nextHop"],
            "recipients": spec["recipients"],
            "source": f"{key[0]}/{key[1]}",
        }
        if spec["recipients"] == "verify":
            entry["verify"] = spec.get("verify", {})
        domains_doc.append(entry)
    return listed, domains_doc


def _distinct(parts: list[ListPart]) -> int:
    """Addresses of a domain's lists, each counted once."""
    if len(parts) == 1:
        return parts[0].distinct
    return len({a for p in parts for a in p.addresses()})


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _domain_files(
    entries: list[dict[str, Any]], recipient_files: list[str], cache: RenderCache | None
) -> dict[str, bytes]:
    """domains.json with the domains in it; for a large install, domains-index.json
    naming the domain shards, and the shards (each fits a ConfigMap).

    Old relays read domains.json only: with the index they find no domains.json,
    keep the configuration they have and wait for their new image."""
    doc = {"format": CONFIG_FORMAT, "domains": entries, "recipientFiles": recipient_files}
    compact = json.dumps(doc, sort_keys=True)
    if len(compact) <= sharding.DOMAINS_INLINE_MAX:
        return {DOMAINS_FILE: _domains_json(doc, compact, cache)}
    shards = render_domain_shards(entries, len(compact), cache)
    if cache is not None:
        cache.domains_json = None
    index = {
        "format": CONFIG_FORMAT,
        "domainFiles": sorted(shards),
        "recipientFiles": recipient_files,
    }
    return {DOMAINS_INDEX_FILE: _json(index), **shards}


def _domains_json(doc: dict[str, Any], compact: str, cache: RenderCache | None) -> bytes:
    # Indented JSON takes the pure-Python encoder (~0.2 s for 10,000 domains);
    # the compact C-encoded form tells whether the last one can be reused.
    if cache is None:
        return _json(doc)
    if cache.domains_json is None or cache.domains_json[0] != compact:
        cache.domains_json = (compact, _json(doc))
    return cache.domains_json[1]


def cross_reference_errors(inv: Inventory) -> list[str]:
    """Problems `mailrelay validate` reports beyond the schema."""
    problems: list[str] = []
    relays = {(_ns(r), _name(r)) for r in inv.relays}
    for dom in inv.domains:
        ref = dom["spec"]["relayRef"]
        target = (ref.get("namespace") or _ns(dom), ref["name"])
        if target not in relays:
            problems.append(
                f"RelayDomain {_ns(dom)}/{_name(dom)}: spec.relayRef: no MailRelay "
                f"{target[0]}/{target[1]} in the manifests"
            )
    for relay in inv.relays:
        for v in render_relay(relay, inv).domains:
            if not v.accepted:
                problems.append(
                    f"RelayDomain {v.namespace}/{v.name}: not accepted by MailRelay "
                    f"{_ns(relay)}/{_name(relay)}: {v.reason}: {v.message}"
                )
    domains = {(_ns(d), _name(d)) for d in inv.domains}
    for rl in inv.recipient_lists:
        key = (_ns(rl), str(rl["spec"]["domainRef"]["name"]))
        if key not in domains:
            problems.append(
                f"RecipientList {_ns(rl)}/{_name(rl)}: spec.domainRef: no RelayDomain "
                f"{key[1]} in namespace {key[0]}"
            )
    return problems
