"""The operator's view of the cluster: what kopf indexes hold, as an Inventory.

The index functions store trimmed, defaulted copies of each object (done once
per change, not once per reconcile); a ClusterView snapshot of them feeds the
same renderer as `mailrelay render`.
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.load import Inventory
from mailrelay_api.spec import AllowedDomainsSpec, relay_spec
from mailrelay_api.validate import fill_defaults, with_defaults
from mailrelay_operator.records import Cached

Key = tuple[str, str]  # (namespace, name)

_KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")
# Of RelayDomains and RecipientLists (the many), no resourceVersion: nothing
# reads theirs (a changed status is told by the status itself), and a
# metadata dict of 5 keys is 88 bytes smaller than one of 6, besides the string.
_KEPT_METADATA_MANY = ("name", "namespace", "uid", "generation", "creationTimestamp")


PACK_LEVEL = 1  # zlib's fastest: a list is packed at each of its events


class PackedAddresses:
    """A RecipientList's spec.addresses as one UTF-8 blob, newline-separated
    and zlib-compressed: about 5 bytes an address where a list of str costs 80
    (the operator keeps every list). Read only when the list changed (the
    render cache holds the addresses it uses, uncompressed, once).
    Iterates as the str it was made of."""

    __slots__ = ("_blob", "_count")

    def __init__(self, blob: bytes, count: int) -> None:
        self._blob, self._count = blob, count

    @classmethod
    def pack(cls, addresses: Any) -> Any:
        """Packed, or `addresses` as they are when they cannot be (not all
        strings, or a newline inside one)."""
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            return addresses
        text = "\n".join(addresses)
        if text.count("\n") != max(len(addresses) - 1, 0) or (addresses and not text):
            return addresses
        blob = zlib.compress(text.encode("utf-8", "surrogatepass"), PACK_LEVEL)
        return cls(blob, len(addresses))

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        if self._count:
            text = zlib.decompress(self._blob).decode("utf-8", "surrogatepass")
            yield from text.split("\n")

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, Iterable) else NotImplemented

    __hash__ = None  # type: ignore[assignment]


def trim(body: Mapping[str, Any], own: bool = False) -> dict[str, Any]:
    """What the renderer and the status writer need from an object, defaults
    applied; a RecipientList's addresses packed (PackedAddresses).

    `own`: `body` is the caller's parsed JSON, held by nobody else; its
    spec's nested values get their defaults in place, not in a deep copy
    (half of a RelayDomain's trim, ~18 us, at every event)."""
    meta = body.get("metadata") or {}
    kept = _KEPT_METADATA_MANY if body.get("kind") in _SHARED_KINDS else _KEPT_METADATA
    obj: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in kept if k in meta},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }
    obj["metadata"].setdefault("namespace", "default")
    out = fill_defaults(obj) if own else with_defaults(obj)
    if out.get("kind") == "RecipientList" and "addresses" in out["spec"]:
        out["spec"]["addresses"] = PackedAddresses.pack(out["spec"]["addresses"])
    return _shared(out)


def trim_input(body: Mapping[str, Any]) -> Cached:
    """A RelayDomain or RecipientList, parsed from JSON for this, trimmed
    (trim, `own`) into the input cache's record."""
    return Cached.of(trim(body, own=True))


# Equal parts of trimmed objects, shared: 100,000 RelayDomains mostly repeat
# the same relayRef, nextHop, verify and status conditions (about 1 KB each
# as their own dicts). The cache's objects are never modified in place.
_SHARED: dict[str, Any] = {}
_SHARED_MAX = 100_000  # distinct parts kept; then it starts over


_SHARED_KINDS = ("RelayDomain", "RecipientList")  # the many; not a MailRelay's big status
_SHARED_KEY_MAX = 2048  # larger parts are not worth a key of their size
# Spec values of one object each (a RelayDomain's domain): interning them
# only adds an entry to the interpreter's table of interned strings (~90
# bytes a RelayDomain); a status event keeps the cached spec anyway.
_OWN_VALUES = frozenset({"domain"})


def shared(value: Any) -> Any:
    """An equal value seen before, if any (then this one is dropped); never modify it."""
    if not isinstance(value, dict | list) or isinstance(value, PackedAddresses):
        return sys.intern(value) if type(value) is str and len(value) < 64 else value
    if isinstance(value, list) and len(value) > 16:
        return value
    key = json.dumps(value, sort_keys=True, separators=(",", ":"))
    if len(key) > _SHARED_KEY_MAX:
        return value
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[key] = value
    return found


def _shared(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its spec's and status's nested values, and short strings, shared."""
    if obj.get("kind") not in _SHARED_KINDS:
        return obj
    meta = obj["metadata"]
    for k in ("namespace", "creationTimestamp"):
        if isinstance(meta.get(k), str):
            meta[k] = sys.intern(meta[k])
    obj["apiVersion"], obj["kind"] = shared(obj["apiVersion"]), shared(obj["kind"])
    for part in ("spec", "status"):
        section = obj.get(part)
        if isinstance(section, dict):
            # Keys too: each parsed event has its own "domain", "relayRef",
            # ... strings (~280 bytes a RelayDomain when kept).
            obj[part] = {
                sys.intern(k): v if k in _OWN_VALUES else shared(v) for k, v in section.items()
            }
    # Most of them have the same status as a whole (the same verdict): one dict
    # for all, not one each (~230 bytes a RelayDomain).
    obj["status"] = shared(obj["status"])
    return obj


def key_of(obj: Mapping[str, Any]) -> Key:
    meta = obj["metadata"]
    return (str(meta.get("namespace") or "default"), str(meta["name"]))


def relay_key_of_domain(dom: Mapping[str, Any]) -> Key:
    ref = dom["spec"]["relayRef"]
    return (str(ref.get("namespace") or key_of(dom)[0]), str(ref["name"]))


def domain_key_of_list(rl: Mapping[str, Any]) -> Key:
    return (key_of(rl)[0], str(rl["spec"]["domainRef"]["name"]))


def first(store: Iterable[Any]) -> Any:
    """The one value a kopf Store holds for a key."""
    for value in store:
        return value
    return None


def _uses_selector(allowed: AllowedDomainsSpec) -> bool:
    """Namespace labels matter to this relay (allowedDomains or one of its grants)."""
    if allowed.grants:
        return any(g.namespaces.from_ == "Selector" for g in allowed.grants)
    return allowed.namespaces.from_ == "Selector"


@dataclass
class ClusterView:
    relays: dict[Key, dict[str, Any]] = field(default_factory=dict)
    domains: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    lists: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict)
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def from_indexes(
        cls,
        relays: Mapping[Any, Iterable[Any]],
        domains: Mapping[Any, Iterable[Any]],
        lists: Mapping[Any, Iterable[Any]],
        namespaces: Mapping[Any, Iterable[Any]],
    ) -> ClusterView:
        def values(index: Mapping[Any, Iterable[Any]]) -> dict[Any, Any]:
            out = {}
            for k in list(index):
                v = first(index[k])
                if v is not None:
                    out[k] = v
            return out

        return cls(values(relays), values(domains), values(lists), values(namespaces))

    def inventory(self) -> Inventory:
        """Sorted by key so the render is deterministic; age decides conflicts."""
        return Inventory(
            relays=[self.relays[k] for k in sorted(self.relays)],
            domains=[self.domains[k] for k in sorted(self.domains)],
            recipient_lists=[self.lists[k] for k in sorted(self.lists)],
            namespace_labels=dict(self.namespace_labels),
        )

    def relay_of_list(self, rl: Mapping[str, Any]) -> Key | None:
        dom = self.domains.get(domain_key_of_list(rl))
        return relay_key_of_domain(dom) if dom else None

    def relays_with_selector(self) -> list[Key]:
        return [k for k, r in self.relays.items() if _uses_selector(relay_spec(r).allowed_domains)]

    def orphan_domains(self) -> list[Mapping[str, Any]]:
        """RelayDomains whose relayRef names no existing MailRelay."""
        return [d for d in self.domains.values() if relay_key_of_domain(d) not in self.relays]

    def orphan_lists(self) -> list[tuple[Mapping[str, Any], str, str]]:
        """RecipientLists no relay renders: (list, reason, message)."""
        out = []
        for rl in self.lists.values():
            dkey = domain_key_of_list(rl)
            dom = self.domains.get(dkey)
            if dom is None:
                out.append(
                    (rl, "DomainNotFound", f"no RelayDomain {dkey[1]} in namespace {dkey[0]}")
                )
            elif relay_key_of_domain(dom) not in self.relays:
                rkey = relay_key_of_domain(dom)
                out.append(
                    (
                        rl,
                        "DomainNotAccepted",
                        f"RelayDomain {dkey[1]} is not accepted: RelayNotFound "
                        f"(no MailRelay {rkey[0]}/{rkey[1]})",
                    )
                )
        return out
