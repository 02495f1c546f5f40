"""Recipient shards: the `listed` addresses as gzip files, each small enough
for one ConfigMap, rendered incrementally.

An address goes to shard crc32(address) mod N, N a power of two chosen from
the total size. One added or removed address therefore changes one shard
(one ConfigMap to apply), and N moves only when the total crosses a power of
two. Inside a shard the addresses are sorted, so the files are a pure
function of the address set.

A RenderCache (kept by the operator between passes) remembers each
RecipientList's addresses split by shard, keyed by uid and generation, with
a digest of each part, and each shard's gzip keyed by the digests of the
parts that fed it: a pass after one list changed re-sorts and re-gzips only
the shards whose addresses changed.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from hashlib import blake2b

RECIPIENT_SHARD = "recipients-{:04d}.txt.gz"
# ConfigMap data is limited to 1 MiB and binaryData is base64 (4/3): keep a
# large margin, as prometheus-operator does for its rule shards.
SHARD_MAX_BYTES = 512 * 1024
# Uncompressed bytes per shard at most (on average): address lists gzip 3-10x,
# so shards land far under SHARD_MAX_BYTES; a shard over it doubles N.
SHARD_RAW_BYTES = 1024 * 1024
# A RecipientList is one object: etcd stores at most 1.5 MiB per request, so
# past 1 MiB of addresses `mailrelay validate` and the list's status advise
# splitting it (several RecipientLists may name the same domain).
RECIPIENT_LIST_ADVISE_BYTES = 1024 * 1024
_JSON_EXTRA = 3  # an address's quotes and comma in the object's JSON


def shard_count(raw_bytes: int) -> int:
    """The number of shards for this many bytes of addresses (a power of two)."""
    count = 1
    while count * SHARD_RAW_BYTES < raw_bytes:
        count *= 2
    return count


def shard_of(address: str, count: int) -> int:
    # crc32 is stable across processes and Python versions (hash() is not).
    return zlib.crc32(address.encode("utf-8", "surrogatepass")) & (count - 1)


@dataclass
class ListPart:
    """One RecipientList's addresses in its domain, lowercased, deduplicated, by shard."""

    key: str | None  # uid/generation/domain, None when it cannot be cached
    parts: list[list[str]]  # parts[i]: the addresses of shard i
    distinct: int  # addresses after deduplication
    raw_bytes: int  # their size, one line each
    in_domain: int = 0  # addresses in the domain as listed (before deduplication)
    foreign: int = 0  # addresses of other domains (ignored)
    digests: list[bytes] = field(default_factory=list)  # of each part, once split
    listed_bytes: int = 0  # the list's addresses as the API server holds them (listed_bytes())

    def for_count(self, count: int) -> ListPart:
        """The same addresses split for another shard count."""
        if len(self.parts) == count and self.digests:
            return self
        parts: list[list[str]] = [[] for _ in range(count)]
        for part in self.parts:
            for address in part:
                parts[shard_of(address, count)].append(address)
        return ListPart(
            self.key,
            parts,
            self.distinct,
            self.raw_bytes,
            self.in_domain,
            self.foreign,
            [_digest(p) for p in parts],
            self.listed_bytes,
        )

    def addresses(self) -> Iterable[str]:
        for part in self.parts:
            yield from part


def _digest(addresses: list[str]) -> bytes:
    return blake2b("\n".join(addresses).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def address_in_domain(lowercased: str, domain: str) -> bool:
    """Whether an address (lowercased) belongs to `domain`: the relay's one test."""
    return lowercased.rpartition("@")[2] == domain


def foreign_addresses(addresses: Iterable[object], domain: str) -> list[int]:
    """The indexes of the addresses not in `domain` (the render ignores them)."""
    return [i for i, a in enumerate(addresses) if not address_in_domain(str(a).lower(), domain)]


def listed_bytes(addresses: Iterable[object]) -> int:
    """About what a RecipientList's addresses weigh in the API server (JSON)."""
    return sum(len(str(a)) + _JSON_EXTRA for a in addresses)


def list_part(key: str | None, addresses: Iterable[object], domain: str) -> ListPart:
    """A RecipientList's addresses of `domain`, lowercased, as one part."""
    ours: list[str] = []
    foreign = size = 0
    for a in addresses:
        text = str(a)
        size += len(text) + _JSON_EXTRA
        low = text.lower()
        if not address_in_domain(low, domain):
            foreign += 1
            continue
        # Keep the object the list already holds when lowercasing changed nothing.
        ours.append(text if low == text else low)
    unique = list(dict.fromkeys(ours))
    return ListPart(
        key=key,
        parts=[unique],
        distinct=len(unique),
        raw_bytes=sum(len(a) + 1 for a in unique),
        in_domain=len(ours),
        foreign=foreign,
        listed_bytes=size,
    )


@dataclass
class ShardBlob:
    count: int  # of shards in its set
    feeders: bytes  # digest of what the lists that fed it put in
    blob: bytes
    addresses: int


@dataclass
class RenderCache:
    """What the renderer may reuse from the previous render of the same relay.

    Not thread-safe: one render at a time per cache.
    """

    lists: dict[str, ListPart] = field(default_factory=dict)  # by ListPart.key
    shards: dict[str, ShardBlob] = field(default_factory=dict)
    domains_json: tuple[str, bytes] | None = None  # (compact JSON, rendered bytes)


@dataclass
class ShardSet:
    files: dict[str, bytes]
    recipients: int  # distinct addresses over all shards
    parts: list[ListPart]  # the lists split for this shard count (worth caching)


def render_shards(parts: list[ListPart], cache: RenderCache | None) -> ShardSet:
    """The shard files of these lists' addresses (empty when there are none)."""
    raw = sum(p.raw_bytes for p in parts)
    if raw == 0:
        if cache is not None:
            cache.shards = {}
        return ShardSet({}, 0, parts)
    count = shard_count(raw)
    while True:
        result = _render_count(parts, count, cache)
        if result is not None:
            return result
        count *= 2  # a shard gzip'd over SHARD_MAX_BYTES


def _render_count(parts: list[ListPart], count: int, cache: RenderCache | None) -> ShardSet | None:
    split = [p.for_count(count) for p in parts]
    previous = cache.shards if cache is not None else {}
    blobs: dict[str, ShardBlob] = {}
    for i in range(count):
        name = RECIPIENT_SHARD.format(i)
        feeding = [p for p in split if p.parts[i]]
        feeders = blake2b(b"".join(p.digests[i] for p in feeding), digest_size=16).digest()
        old = previous.get(name)
        if old is not None and (old.count, old.feeders) == (count, feeders):
            blobs[name] = old
            continue
        addresses: set[str] = set()
        for p in feeding:
            addresses.update(p.parts[i])
        lines = sorted(addresses)
        text = "\n".join(lines) + "\n" if lines else ""
        blob = gzip.compress(text.encode("utf-8", "surrogatepass"), compresslevel=6, mtime=0)
        if len(blob) > SHARD_MAX_BYTES:
            return None
        blobs[name] = ShardBlob(count, feeders, blob, len(addresses))
    if cache is not None:
        cache.shards = blobs
    return ShardSet(
        files={name: b.blob for name, b in blobs.items()},
        recipients=sum(b.addresses for b in blobs.values()),
        parts=split,
    )
