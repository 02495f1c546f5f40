"""The operator's own cache of RelayDomains and RecipientLists (trimmed, defaulted).

They are many (10,000 and more), so they are not kopf indexes, whose start-up
readiness wait grows with the square of the objects listed. `seed` lists
them (at start-up, before kopf watches, and at each resync, which also drops
objects whose deletion was missed); `store` keeps them current from events.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mailrelay_api.schema import API_VERSION
from mailrelay_operator.cluster import Key, key_of, trim
from mailrelay_operator.kubeapi import KubeApi, KubeObject, resource_path

Cache = dict[Key, KubeObject]


@dataclass
class InputCache:
    domains: Cache = field(default_factory=dict)
    lists: Cache = field(default_factory=dict)

    def of_kind(self, kind: str) -> Cache:
        return self.domains if kind == "RelayDomain" else self.lists

    async def seed(self, api: KubeApi, namespaces: tuple[str, ...]) -> None:
        """Lists both kinds in each served namespace (empty: across all of them)."""
        scopes: tuple[str | None, ...] = namespaces or (None,)
        for kind in ("RelayDomain", "RecipientList"):
            for namespace in scopes:
                items, version = await api.list_all(resource_path(API_VERSION, kind, namespace))
                fresh = await asyncio.to_thread(trim_all, items, kind)
                merge_listing(self.of_kind(kind), fresh, version, namespace)


def store(cache: Cache, obj: KubeObject, deleted: bool) -> None:
    if deleted:
        cache.pop(key_of(obj), None)
    else:
        cache[key_of(obj)] = same_spec_kept(cache.get(key_of(obj)), obj)


def same_spec_kept(old: KubeObject | None, new: KubeObject) -> KubeObject:
    """`new`, holding the spec of `old` when it is the same generation of the same object.

    A status write sends every RecipientList back with a fresh copy of its
    addresses; the render cache holds the old strings, so keeping them saves
    a second copy of every address (about 70 MB for 1,000,000).
    """
    if old is not None:
        o, n = old["metadata"], new["metadata"]
        same = (o.get("uid"), o.get("generation")) == (n.get("uid"), n.get("generation"))
        if same and n.get("uid") and n.get("generation") is not None:
            new["spec"] = old["spec"]
    return new


def trim_all(items: list[KubeObject], kind: str) -> Cache:
    out = {}
    for item in items:
        # A listing's items carry neither apiVersion nor kind.
        item.setdefault("apiVersion", API_VERSION)
        item.setdefault("kind", kind)
        obj = trim(item)
        out[key_of(obj)] = obj
    return out


def _version(obj: KubeObject) -> int | None:
    try:
        return int(obj["metadata"].get("resourceVersion") or "")
    except ValueError:
        return None


def merge_listing(cache: Cache, fresh: Cache, list_version: str, namespace: str | None) -> None:
    """Merges a listing into a cache that events may have updated meanwhile.

    resourceVersions are etcd revisions in practice: a cached object newer than
    the listing stays; one the listing no longer has and that is not newer
    than the listing was deleted.
    """
    try:
        listed_at: int | None = int(list_version)
    except ValueError:
        listed_at = None
    for key, obj in fresh.items():
        old = cache.get(key)
        old_v, new_v = (_version(old) if old else None), _version(obj)
        if old is None or old_v is None or new_v is None or old_v <= new_v:
            cache[key] = same_spec_kept(old, obj)
    for key in [k for k in cache if k not in fresh and (namespace is None or k[0] == namespace)]:
        v = _version(cache[key])
        if listed_at is None or v is None or v <= listed_at:
            del cache[key]
