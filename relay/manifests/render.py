"""Manifests -> the relay's configuration files. One renderer for everyone.

The operator writes these files into ConfigMaps, `mailrelay render` prints
them, and `mailrelay run` writes them to a folder and starts the relay on it.
Pure functions: objects in, files and verdicts out.

Files:
- relay.json    the MailRelay's policy (spec with defaults), reloadable live
- domains.json   the accepted domains with their next hops, reloadable live
- recipients-NNNN.txt.gz  the merged recipient tables of `listed` domains,
                 one lowercased address a line, sorted, gzip, each shard small
                 enough for one ConfigMap
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from relay.manifests.load import Inventory

CONFIG_FORMAT = 1
RELAY_FILE = "relay.json"
DOMAINS_FILE = "domains.json"
RECIPIENT_SHARD = "recipients-{:04d}.txt.gz"
# ConfigMap data is limited to 1 MiB and binaryData is base64 (4/3): keep a
# large margin, as prometheus-operator does for its rule shards.
SHARD_MAX_BYTES = 512 * 1024


@dataclass
class DomainVerdict:
    """Whether a RelayDomain is attached to a relay, and why not."""

    namespace: str
    name: str
    domain: str
    accepted: bool
    reason: str  # Accepted | Conflict | NotAllowed | RelayNotFound | NoRecipients
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
    # Older wins; offline objects have no timestamp and keep their file order.
    ts = str(obj["metadata"].get("creationTimestamp") or "")
    return (ts or "9999", index, _ns(obj), _name(obj))


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def namespace_allowed(
    relay: dict[str, Any], namespace: str, namespace_labels: dict[str, dict[str, str]]
) -> bool:
    """MailRelay.spec.allowedDomains.namespaces, Gateway API style."""
    rule = relay["spec"]["allowedDomains"]["namespaces"]
    frm = rule.get("from", "Same")
    if frm == "All":
        return True
    if frm == "Same":
        return namespace == _ns(relay)
    return selector_matches(rule.get("selector") or {}, namespace_labels.get(namespace, {}))


def refers_to(domain: dict[str, Any], relay: dict[str, Any]) -> bool:
    ref = domain["spec"]["relayRef"]
    return ref["name"] == _name(relay) and (ref.get("namespace") or _ns(domain)) == _ns(relay)


def attach_domains(
    relay: dict[str, Any], inv: Inventory
) -> tuple[list[dict[str, Any]], list[DomainVerdict]]:
    """The RelayDomains attached to a relay (oldest claim wins), with a verdict each."""
    accepted: list[dict[str, Any]] = []
    verdicts: list[DomainVerdict] = []
    owner: dict[str, str] = {}
    candidates = [(i, d) for i, d in enumerate(inv.domains) if refers_to(d, relay)]
    for _, dom in sorted(candidates, key=lambda c: _age_key(c[1], c[0])):
        domain = str(dom["spec"]["domain"]).lower().rstrip(".")
        key = f"{_ns(dom)}/{_name(dom)}"
        if not namespace_allowed(relay, _ns(dom), inv.namespace_labels):
            verdicts.append(
                DomainVerdict(
                    _ns(dom),
                    _name(dom),
                    domain,
                    False,
                    "NotAllowed",
                    f"MailRelay {_ns(relay)}/{_name(relay)} does not allow domains from "
                    f"namespace {_ns(dom)}",
                )
            )
        elif domain in owner:
            verdicts.append(
                DomainVerdict(
                    _ns(dom),
                    _name(dom),
                    domain,
                    False,
                    "Conflict",
                    f"{domain} is already claimed by RelayDomain {owner[domain]}",
                )
            )
        else:
            owner[domain] = key
            accepted.append(dom)
            verdicts.append(DomainVerdict(_ns(dom), _name(dom), domain, True, "Accepted", ""))
    return accepted, verdicts


def _recipient_shards(addresses: list[str]) -> dict[str, bytes]:
    """Sorted addresses gzip'd into shards of at most SHARD_MAX_BYTES each."""
    shards: dict[str, bytes] = {}
    if not addresses:
        return shards
    # Address lists compress about 4x; start with a generous raw chunk and
    # halve any chunk whose compressed form is still too large.
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    for addr in addresses:
        chunk.append(addr)
        size += len(addr) + 1
        if size >= SHARD_MAX_BYTES * 2:
            chunks.append(chunk)
            chunk, size = [], 0
    if chunk:
        chunks.append(chunk)
    blobs: list[bytes] = []
    while chunks:
        part = chunks.pop(0)
        blob = gzip.compress(("\n".join(part) + "\n").encode(), compresslevel=6, mtime=0)
        if len(blob) > SHARD_MAX_BYTES and len(part) > 1:
            half = len(part) // 2
            chunks[:0] = [part[:half], part[half:]]
            continue
        blobs.append(blob)
    for i, blob in enumerate(blobs):
        shards[RECIPIENT_SHARD.format(i)] = blob
    return shards


def _in_domain(address: str, domain: str) -> bool:
    return address.rpartition("@")[2] == domain


def render_relay(relay: dict[str, Any], inv: Inventory) -> Rendered:
    """The configuration files of one MailRelay, and the verdicts behind them."""
    attached, verdicts = attach_domains(relay, inv)
    by_key = {(_ns(d), _name(d)): d for d in attached}
    verdict_of = {(v.namespace, v.name): v for v in verdicts}
    listed: set[str] = set()
    list_verdicts: list[RecipientListVerdict] = []
    per_domain: dict[tuple[str, str], set[str]] = {k: set() for k in by_key}
    for rl in inv.recipient_lists:
        key = (_ns(rl), str(rl["spec"]["domainRef"]["name"]))
        dom = by_key.get(key)
        if dom is None:
            v = verdict_of.get(key)
            if v is None:
                # It belongs to another relay's domain, or to none at all.
                if not any((_ns(d), _name(d)) == key for d in inv.domains):
                    list_verdicts.append(
                        RecipientListVerdict(
                            _ns(rl),
                            _name(rl),
                            False,
                            "DomainNotFound",
                            f"no RelayDomain {key[1]} in namespace {key[0]}",
                        )
                    )
                continue
            list_verdicts.append(
                RecipientListVerdict(
                    _ns(rl),
                    _name(rl),
                    False,
                    "DomainNotAccepted",
                    f"RelayDomain {key[1]} is not accepted: {v.reason}",
                )
            )
            continue
        domain = str(dom["spec"]["domain"]).lower().rstrip(".")
        addrs = [str(a).lower() for a in rl["spec"]["addresses"]]
        ours = [a for a in addrs if _in_domain(a, domain)]
        foreign = len(addrs) - len(ours)
        per_domain[key].update(ours)
        list_verdicts.append(
            RecipientListVerdict(
                _ns(rl),
                _name(rl),
                True,
                "ForeignAddresses" if foreign else "Accepted",
                f"{foreign} address(es) not in {domain} ignored" if foreign else "",
                len(ours),
            )
        )

    domains_doc = []
    for dom in sorted(attached, key=lambda d: str(d["spec"]["domain"]).lower()):
        key = (_ns(dom), _name(dom))
        spec = dom["spec"]
        domain = str(spec["domain"]).lower().rstrip(".")
        v = verdict_of[key]
        if spec["recipients"] == "listed":
            listed |= per_domain[key]
            v.recipients = len(per_domain[key])
            if not per_domain[key]:
                v.reason = "NoRecipients"
                v.message = "recipients: listed and no RecipientList: every address is refused"
        domains_doc.append(
            {
                "domain": domain,
                "nextHop": spec["nextHop"],
                "recipients": spec["recipients"],
                "source": f"{key[0]}/{key[1]}",
            }
        )

    shards = _recipient_shards(sorted(listed))
    policy = {k: v for k, v in relay["spec"].items() if k not in ("replicas", "storage", "image")}
    relay_doc = {
        "format": CONFIG_FORMAT,
        "name": f"{_ns(relay)}/{_name(relay)}",
        "policy": policy,
    }
    files: dict[str, bytes] = {
        RELAY_FILE: _json(relay_doc),
        DOMAINS_FILE: _json(
            {"format": CONFIG_FORMAT, "domains": domains_doc, "recipientFiles": sorted(shards)}
        ),
        **shards,
    }
    return Rendered(
        namespace=_ns(relay),
        name=_name(relay),
        files=files,
        domains=verdicts,
        recipient_lists=list_verdicts,
        recipients=len(listed),
    )


def _json(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


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
