"""The relay's recipient table: exact, case-insensitive address membership.

A million addresses as a set[str] cost about 106 MB in the relay; here each
address is a 64-bit keyed BLAKE2b hash (a fresh random key per table, so
nobody outside can aim at a collision) kept in sorted array('Q') buckets
(8 bytes an address, about 8 MB for a million) and found with bisect.

False positives: an address that is not in a table of n addresses matches
one of them with probability n / 2**64, about 5.4e-14 per lookup for
n = 1,000,000. False negatives: none.
"""

from __future__ import annotations

import gzip
import os
from array import array
from bisect import bisect_left
from collections.abc import Iterable
from hashlib import blake2b
from pathlib import Path
from typing import Protocol

# Buckets by the hash's top byte: each sorts on its own while loading, so the
# load never holds a million Python ints at once.
_BUCKET_BITS = 8
_BUCKET_SHIFT = 64 - _BUCKET_BITS


class RecipientLookup(Protocol):
    """What the policy asks of a recipient table (a set[str] also fits)."""

    def __contains__(self, address: object, /) -> bool: ...

    def __len__(self) -> int: ...


class RecipientTable:
    """Lowercased addresses as sorted 64-bit keyed hashes; immutable once built."""

    __slots__ = ("_buckets", "_count", "_keyed")

    def __init__(self, addresses: Iterable[str] = (), *, key: bytes | None = None) -> None:
        # Copying a keyed state is faster than keying a new one per address.
        self._keyed = blake2b(digest_size=8, key=key if key is not None else os.urandom(16))
        buckets: list[array[int]] = [array("Q") for _ in range(1 << _BUCKET_BITS)]
        for address in addresses:
            h = self._hash(address.lower().encode("utf-8", "surrogatepass"))
            buckets[h >> _BUCKET_SHIFT].append(h)
        self._buckets = buckets
        self._count = 0
        self._seal()

    @classmethod
    def from_shards(cls, paths: Iterable[Path], *, key: bytes | None = None) -> RecipientTable:
        """Reads gzip shards of one address a line, one shard's text at a time."""
        table = cls(key=key)
        buckets = table._buckets
        for path in paths:
            text = gzip.decompress(path.read_bytes())
            for line in text.split(b"\n"):
                line = line.strip()
                if not line:
                    continue
                # bytes.lower() is ASCII only; anything else goes through str.lower().
                line = (
                    line.lower()
                    if line.isascii()
                    else line.decode("utf-8", "surrogateescape")
                    .lower()
                    .encode("utf-8", "surrogatepass")
                )
                h = table._hash(line)
                buckets[h >> _BUCKET_SHIFT].append(h)
            del text
        table._seal()
        return table

    def _hash(self, data: bytes) -> int:
        h = self._keyed.copy()
        h.update(data)
        return int.from_bytes(h.digest(), "big")

    def _seal(self) -> None:
        """Sorts and deduplicates each bucket into an exactly sized array."""
        for i, bucket in enumerate(self._buckets):
            if bucket:
                self._buckets[i] = array("Q", sorted(set(bucket)))
        self._count = sum(len(b) for b in self._buckets)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        h = self._hash(address.lower().encode("utf-8", "surrogatepass"))
        bucket = self._buckets[h >> _BUCKET_SHIFT]
        i = bisect_left(bucket, h)
        return i < len(bucket) and bucket[i] == h

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"RecipientTable({self._count} addresses)"

    @property
    def nbytes(self) -> int:
        """Bytes held by the hashes (the arrays' payload)."""
        return sum(b.buffer_info()[1] * b.itemsize for b in self._buckets)
