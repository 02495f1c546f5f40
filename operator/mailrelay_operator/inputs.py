"""The operator's own cache of RelayDomains and RecipientLists (trimmed, defaulted).

They are many (100,000 and more), so neither kopf indexes (whose start-up
readiness wait grows with the square of the objects listed) nor kopf
handlers: input_watch.py lists and watches them, and `store` (through the
EventRouter) keeps them here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailrelay_api.schema import API_VERSION
from mailrelay_operator.cluster import Key, trim_input
from mailrelay_operator.kubeapi import KubeObject
from mailrelay_operator.records import Cached

Cache = dict[Key, Cached]
# RelayDomains first: a RecipientList finds its relay through its domain.
INPUT_KINDS = ("RelayDomain", "RecipientList")


@dataclass
class InputCache:
    domains: Cache = field(default_factory=dict)
    lists: Cache = field(default_factory=dict)

    def of_kind(self, kind: str) -> Cache:
        return self.domains if kind == "RelayDomain" else self.lists

    def current(self, kind: str, key: Key) -> Cached | None:
        return self.of_kind(kind).get(key)


def store(cache: Cache, obj: Cached, deleted: bool) -> None:
    if deleted:
        cache.pop(obj.key, None)
    else:
        cache[obj.key] = same_spec_kept(cache.get(obj.key), obj)


def same_spec_kept(old: Cached | None, new: Cached) -> Cached:
    """`new`, holding the spec of `old` when it is the same generation of the same object.

    A status write sends every RecipientList back with a fresh copy of its
    addresses; the render cache holds the old strings, so keeping them saves
    a second copy of every address (about 70 MB for 1,000,000). Of the same
    object (uid) at any generation, `new` takes the old key (the cache's key
    tuple, with the name string the status writer and the render cache hold)
    and uid string: a second copy of them is ~200 bytes a RelayDomain after
    its status write.
    `new` is not in the cache yet: these are its only changes (records.py).
    """
    if old is not None and new.uid and old.uid == new.uid:
        if old.key == new.key:
            new.uid, new.key = old.uid, old.key
        if new.generation is not None and old.generation == new.generation:
            new.spec = old.spec
    return new


def trim_all(items: list[KubeObject], kind: str) -> dict[Key, Cached]:
    out = {}
    for item in items:
        # A listing's items carry neither apiVersion nor kind.
        item.setdefault("apiVersion", API_VERSION)
        item.setdefault("kind", kind)
        obj = trim_input(item)
        out[obj.key] = obj
    return out
