"""A cached RelayDomain or RecipientList as one slotted record (cluster.trim).

The input cache holds 100,000 RelayDomains and more. As dicts each was a
top-level dict and a metadata dict (~370 bytes, their apiVersion and kind
referenced from every one); a Cached is one object of 7 slots (~88 bytes),
its apiVersion and kind held once per kind (an ObjectType), its namespace
and name in the (namespace, name) tuple the cache is keyed by.

Readers take it as the read-only mapping the trimmed dict was (render,
status, the status writer and the Events read obj["metadata"]["name"],
obj.get("status"), ...): `obj["metadata"]` is a Metadata view made on the
spot. Code that knows it has a Cached reads the attributes.

A RelayDomain's spec is a DomainSpec (~80 bytes where its dict was ~184):
a slotted mapping of the schema's keys, in the order the dict had them.

Contract: a Cached is never changed once it is in the cache; `inputs.store`
may set the key, uid and spec of a new one (before it is stored) to the
equal objects of the one it replaces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec", "status")
# metadata key -> slot; None in a slot: the object had no such key.
_META_SLOTS = {
    "name": "name",  # properties of the key
    "namespace": "namespace",
    "uid": "uid",
    "generation": "generation",
    "creationTimestamp": "created",
}


class ObjectType(NamedTuple):
    api_version: str
    kind: str


_TYPES: dict[ObjectType, ObjectType] = {}


def object_type(api_version: str, kind: str) -> ObjectType:
    """One ObjectType per (apiVersion, kind), shared by every record of it."""
    t = ObjectType(api_version, kind)
    return _TYPES.setdefault(t, t)


class Cached(Mapping[str, Any]):
    """A trimmed RelayDomain or RecipientList: typed attributes, read as a
    mapping of apiVersion, kind, metadata, spec and status."""

    __slots__ = ("created", "generation", "key", "spec", "status", "type", "uid")

    def __init__(
        self,
        type_: ObjectType,
        name: str,
        namespace: str,
        uid: str | None,
        generation: int | None,
        created: str | None,
        spec: Mapping[str, Any],
        status: dict[str, Any],
    ) -> None:
        self.type = type_
        self.key: tuple[str, str] = (namespace, name)
        self.uid = uid
        self.generation, self.created = generation, created
        self.spec, self.status = spec, status

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> Cached:
        """From a trimmed object (its metadata: the keys of _META_SLOTS)."""
        meta = obj["metadata"]
        spec = _dict_or_empty(obj.get("spec"))
        return cls(
            object_type(str(obj.get("apiVersion")), str(obj.get("kind"))),
            meta["name"],
            meta.get("namespace") or "default",
            meta.get("uid"),
            meta.get("generation"),
            meta.get("creationTimestamp"),
            DomainSpec.of(spec) if obj.get("kind") == "RelayDomain" else spec,
            _dict_or_empty(obj.get("status")),
        )

    @property
    def kind(self) -> str:
        return self.type.kind

    @property
    def namespace(self) -> str:
        return self.key[0]

    @property
    def name(self) -> str:
        return self.key[1]

    def __getitem__(self, key: str) -> Any:
        if key == "spec":
            return self.spec
        if key == "metadata":
            return Metadata(self)
        if key == "status":
            return self.status
        if key == "kind":
            return self.type.kind
        if key == "apiVersion":
            return self.type.api_version
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in _TOP_KEYS else default

    def __contains__(self, key: object) -> bool:
        return key in _TOP_KEYS

    def __iter__(self) -> Iterator[str]:
        return iter(_TOP_KEYS)

    def __len__(self) -> int:
        return len(_TOP_KEYS)

    def __repr__(self) -> str:
        return f"Cached({dict(self)!r})"


def _dict_or_empty(value: Any) -> dict[str, Any]:
    """`value` itself, even when empty (trim shares one empty status among
    all): `or {}` would make a new one per record."""
    return value if isinstance(value, dict) else {}


class Metadata(Mapping[str, Any]):
    """A Cached's metadata, read as the dict it was trimmed to."""

    __slots__ = ("_of",)

    def __init__(self, of: Cached) -> None:
        self._of = of

    def _value(self, key: str) -> Any:
        """The slot's value; None: no such key (as the trimmed dict had none)."""
        slot = _META_SLOTS.get(key)
        return None if slot is None else getattr(self._of, slot)

    def __getitem__(self, key: str) -> Any:
        value = self._value(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self._value(key)
        return default if value is None else value

    def __iter__(self) -> Iterator[str]:
        return (k for k, slot in _META_SLOTS.items() if getattr(self._of, slot) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


# The keys of a spec in its order, one tuple per order seen (a handful).
_SHAPES: dict[tuple[str, ...], tuple[str, ...]] = {}


class DomainSpec(Mapping[str, Any]):
    """A RelayDomain's spec, read as the dict it was made of (its keys in the
    same order, a missing one missing); its values are the dict's own (the
    shared relayRef, nextHop and verify stay shared). Never changed: the
    render cache knows a spec by its identity (domain_facts._Known)."""

    __slots__ = ("_keys", "domain", "nextHop", "recipients", "relayRef", "verify")

    _keys: tuple[str, ...]

    @classmethod
    def of(cls, spec: dict[str, Any]) -> Mapping[str, Any]:
        """A DomainSpec of `spec`; `spec` itself if it has other keys."""
        keys = tuple(spec)
        if not _DOMAIN_SPEC_KEYS.issuperset(keys):
            return spec
        out = cls.__new__(cls)
        out._keys = _SHAPES.setdefault(keys, keys)
        for key, value in spec.items():
            setattr(out, key, value)
        return out

    def __getitem__(self, key: str) -> Any:
        if key in self._keys:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._keys else default

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return repr(dict(self))


# A RelayDomain's spec keys: DomainSpec's slots (tests/operator/test_records.py:
# schema.RELAYDOMAIN_SPEC's properties); a spec with any other key stays a dict.
_DOMAIN_SPEC_KEYS = frozenset(DomainSpec.__slots__) - {"_keys"}
