"""The operator's own cache of RelayDomains and RecipientLists (trimmed, defaulted).

They are many (100,000 and more), so neither kopf indexes (whose start-up
readiness wait grows with the square of the objects listed) nor kopf
handlers: input_watch.py lists and watches them, and `store` (through the
EventRouter) keeps them here.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from mailrelay_api.schema import API_VERSION
from mailrelay_operator.cluster import Key, trim_input
from mailrelay_operator.kubeapi import KubeObject
from mailrelay_operator.records import Cached

Cache = dict[Key, Cached]
# RelayDomains first: a RecipientList finds its relay through its domain.
INPUT_KINDS = ("RelayDomain", "RecipientList")


class Snapshot(Mapping[Key, Cached]):
    """A cache as it was when taken (InputCache.snapshot), without a copy of it:
    it reads the cache itself, except for the keys stored since, whose value
    then (None: absent) InputCache.store keeps in `before`. Cached records
    are never changed in place (a change is a new record), so this is the
    picture a copy would hold. Read it on the event loop's thread, where the
    cache changes: not across an await while iterating."""

    __slots__ = ("__weakref__", "before", "live")

    def __init__(self, live: Cache) -> None:
        self.live = live
        self.before: dict[Key, Cached | None] = {}

    def __getitem__(self, key: Key) -> Cached:
        if key in self.before:
            old = self.before[key]
            if old is None:
                raise KeyError(key)
            return old
        return self.live[key]

    def __iter__(self) -> Iterator[Key]:
        before = self.before
        for key in self.live:
            if key not in before:
                yield key
        for key, old in before.items():
            if old is not None:
                yield key

    def __len__(self) -> int:
        changed = self.before.items()
        return (
            len(self.live)
            - sum(k in self.live for k, _ in changed)
            + sum(old is not None for _, old in changed)
        )


@dataclass
class InputCache:
    domains: Cache = field(default_factory=dict)
    lists: Cache = field(default_factory=dict)
    # The snapshots taken, by kind, while alive: each keeps what a store
    # changes under it (weak references: a Mapping is no set member).
    snapshots: dict[str, list[weakref.ref[Snapshot]]] = field(
        default_factory=lambda: {k: [] for k in INPUT_KINDS}
    )

    def of_kind(self, kind: str) -> Cache:
        return self.domains if kind == "RelayDomain" else self.lists

    def current(self, kind: str, key: Key) -> Cached | None:
        return self.of_kind(kind).get(key)

    def snapshot(self, kind: str) -> Snapshot:
        """The cache of this kind as it is now, kept so while the snapshot lives
        (a pass's view: ~5 MiB a copy at 100,000 RelayDomains)."""
        snap = Snapshot(self.of_kind(kind))
        self.snapshots[kind] = [*self._alive(kind), weakref.ref(snap)]
        return snap

    def _alive(self, kind: str) -> list[weakref.ref[Snapshot]]:
        return [ref for ref in self.snapshots[kind] if ref() is not None]

    def store(self, kind: str, obj: Cached, deleted: bool) -> None:
        """`store` into the cache of this kind; its snapshots keep the value before."""
        cache = self.of_kind(kind)
        if self.snapshots[kind]:
            self.snapshots[kind] = alive = self._alive(kind)
            for ref in alive:
                snap = ref()
                if snap is not None:
                    snap.before.setdefault(obj.key, cache.get(obj.key))
        store(cache, obj, deleted)


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
