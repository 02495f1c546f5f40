"""The operator's view of the cluster: what kopf indexes hold, as an Inventory.

The index functions store trimmed, defaulted copies of each object (done once
per change, not once per reconcile); a ClusterView snapshot of them feeds the
same renderer as `mailrelay render`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mailrelay_api.load import Inventory
from mailrelay_api.spec import AllowedDomainsSpec, relay_spec
from mailrelay_api.validate import with_defaults

Key = tuple[str, str]  # (namespace, name)

_KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp", "resourceVersion")


def trim(body: Mapping[str, Any]) -> dict[str, Any]:
    """What the renderer and the status writer need from an object, defaults applied."""
    meta = body.get("metadata") or {}
    obj: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in _KEPT_METADATA if k in meta},
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }
    obj["metadata"].setdefault("namespace", "default")
    return with_defaults(obj)


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
    domains: dict[Key, dict[str, Any]] = field(default_factory=dict)
    lists: dict[Key, dict[str, Any]] = field(default_factory=dict)
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

    def orphan_domains(self) -> list[dict[str, Any]]:
        """RelayDomains whose relayRef names no existing MailRelay."""
        return [d for d in self.domains.values() if relay_key_of_domain(d) not in self.relays]

    def orphan_lists(self) -> list[tuple[dict[str, Any], str, str]]:
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
