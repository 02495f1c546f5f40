"""Recipient and domain shards: the `listed` addresses, and the domains of a
large install, as gzip files, each small enough for one ConfigMap, rendered
incrementally.

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

Domains go the same way once domains.json would outgrow its ConfigMap
(DOMAINS_INLINE_MAX): entry to shard crc32(domain) mod N, N a power of two
from the total size, each shard a JSON list sorted by domain. The cache
keeps each RelayDomain's facts (domain_facts.DomainFacts, one object per spec
seen) and each domain shard's gzip with the facts that fed it: a pass after
one domain changed encodes only the shard it falls in.

Every shard's name carries N (recipients-0003-of-0008.txt.gz,
domains-0003-of-0008.json.gz), and the file that names the shards
(domains.json or domains-index.json) lists them all. The ConfigMaps are
written one at a time and the kubelet refreshes each on its own schedule,
so a relay may see the index of one shard count next to shards of another:
it then finds a named file missing (shard_set_problem here, the relay's
config.shard_set) and keeps the configuration it has, rather than loading
half the domains, or a recipient table where an address's shard is of the
wrong count (real recipients refused, removed ones accepted). Shards of the
same count may come from different renders: each holds exactly the
addresses (or domains) that hash to it, so every lookup sees either the old
or the new answer for its address, never a mix.
"""

from __future__ import annotations

import gzip
import itertools
import json
import operator
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from mailrelay_api.domain_facts import DomainFacts
    from mailrelay_api.spec import NextHopSpec

RECIPIENT_SHARD = "recipients-{:04d}-of-{:04d}.txt.gz"
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
DOMAIN_SHARD = "domains-{:04d}-of-{:04d}.json.gz"
# domains.json holds its domains itself up to this size (compact JSON; about
# 1,500 domains); a larger install gets domain shards and an index file.
DOMAINS_INLINE_MAX = 256 * 1024
# Uncompressed bytes of domain entries per shard (on average): the entries
# gzip about 10x, far under SHARD_MAX_BYTES.
DOMAIN_SHARD_RAW_BYTES = 2 * 1024 * 1024
# Any shard's name; recipient shards rendered by an earlier operator have no
# count in their name (recipients-0003.txt.gz): a relay still reads them.
_SHARD_NAME = re.compile(r"^(recipients|domains)-(\d{4,})(?:-of-(\d{4,}))?\.(?:txt|json)\.gz$")


@dataclass(frozen=True)
class ShardName:
    kind: str  # recipients | domains
    index: int
    count: int | None  # None: an older operator's recipient shard, without its count


def parse_shard_name(name: str) -> ShardName | None:
    """What a shard file's name says (None: not a shard's name)."""
    m = _SHARD_NAME.match(name)
    if m is None or (m.group(1) == "domains" and m.group(3) is None):
        return None
    return ShardName(m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None)


def shard_set_problem(names: list[str]) -> str | None:
    """Why these names (as an index lists them) are not one whole set of shards
    of one count, 0 to N-1 (None: they are). Names without a count (an older
    operator's) pass as they are: nothing in them can be checked."""
    parsed = [parse_shard_name(n) for n in names]
    if any(p is None for p in parsed):
        return f"not a shard's name among {names[:3]}..."
    counts = {p.count for p in parsed if p is not None}
    if not names or counts == {None}:
        return None
    if len(counts) > 1:
        return f"shards of several counts named together: {sorted(map(str, counts))}"
    (count,) = counts
    indexes = sorted(p.index for p in parsed if p is not None)
    if indexes != list(range(count or 0)):
        return f"the shards named are not 0 to {count}-1 of {count}"
    return None


def shard_count(raw_bytes: int, per_shard: int | None = None) -> int:
    """The number of shards for this many bytes (a power of two); per_shard
    defaults to SHARD_RAW_BYTES (recipient shards)."""
    per = per_shard if per_shard is not None else SHARD_RAW_BYTES
    count = 1
    while count * per < raw_bytes:
        count *= 2
    return count


def shard_of(address: str, count: int) -> int:
    # crc32 is stable across processes and Python versions (hash() is not).
    return zlib.crc32(address.encode("utf-8", "surrogatepass")) & (count - 1)


# zlib's fastest: parts are packed at each split, unpacked for each changed shard.
PART_PACK_LEVEL = 1


def _pack(lines: list[bytes]) -> bytes:
    """Addresses joined by newlines, zlib-compressed; no address: b"" (not packed)."""
    return zlib.compress(b"\n".join(lines), PART_PACK_LEVEL) if lines else b""


def _unpack(part: bytes) -> list[bytes]:
    return zlib.decompress(part).split(b"\n") if part else []


@dataclass
class ListPart:
    """One RecipientList's addresses in its domain, lowercased, deduplicated, by shard.

    Each part is packed: the UTF-8 addresses joined by newlines and
    zlib-compressed (about 10 bytes an address, where a list of str costs
    80): the operator keeps every list's part between renders.
    """

    key: str | None  # uid/generation/domain, None when it cannot be cached
    parts: list[bytes]  # parts[i]: the addresses of shard i, packed
    distinct: int  # addresses after deduplication
    raw_bytes: int  # their size, one line each
    in_domain: int = 0  # addresses in the domain as listed (before deduplication)
    foreign: int = 0  # addresses of other domains (ignored)
    digests: list[bytes] = field(default_factory=list)  # of each part, once split
    listed_bytes: int = 0  # the list's addresses as the API server holds them (listed_bytes())

    def for_count(self, count: int) -> ListPart:
        """The same addresses split for another shard count, in place: the
        unsplit addresses are not kept beside the split ones (a million
        addresses would be held twice while the shards render)."""
        if len(self.parts) == count and self.digests:
            return self
        split: list[list[bytes]] = [[] for _ in range(count)]
        mask = count - 1
        for part in self.parts:
            for address in _unpack(part):
                split[zlib.crc32(address) & mask].append(address)
        self.parts = [_pack(p) for p in split]
        self.digests = [_digest(p) for p in self.parts]
        return self

    def addresses(self) -> Iterable[bytes]:
        """The addresses, UTF-8 encoded."""
        for part in self.parts:
            yield from _unpack(part)


def _digest(part: bytes) -> bytes:
    return blake2b(part, digest_size=16).digest()


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
        ours.append(low)
    unique = [a.encode("utf-8", "surrogatepass") for a in dict.fromkeys(ours)]
    return ListPart(
        key=key,
        parts=[_pack(unique)],
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
    # domain shard name -> (the domains that fed it, its gzip)
    domain_shards: dict[str, tuple[list[DomainEntry], bytes]] = field(default_factory=dict)
    # the last render's DomainFacts (domain_facts.py), of the domains that refer
    # to the relay in its inventory order, valid while domain_policy (the
    # relay's policy, namespace labels and cluster networks) stays the same
    domain_facts: list[DomainFacts] = field(default_factory=list)
    domain_policy: str | None = None
    next_hops: dict[NextHopSpec, NextHopSpec] = field(default_factory=dict)  # each held once


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
        name = RECIPIENT_SHARD.format(i, count)
        feeding = [p for p in split if p.parts[i]]
        feeders = blake2b(b"".join(p.digests[i] for p in feeding), digest_size=16).digest()
        old = previous.get(name)
        if old is not None and (old.count, old.feeders) == (count, feeders):
            blobs[name] = old
            continue
        # UTF-8 sorts as code points do: the order of the addresses as text.
        # Sorted, then each address once (no set of them beside the list).
        unpacked = itertools.chain.from_iterable(_unpack(p.parts[i]) for p in feeding)
        lines = list(map(operator.itemgetter(0), itertools.groupby(sorted(unpacked))))
        distinct = len(lines)
        lines.append(b"")  # the last line's newline, in the one join
        blob = gzip.compress(b"\n".join(lines), compresslevel=6, mtime=0)
        del lines
        if len(blob) > SHARD_MAX_BYTES:
            return None
        blobs[name] = ShardBlob(count, feeders, blob, distinct)
    if cache is not None:
        cache.shards = blobs
    return ShardSet(
        files={name: b.blob for name, b in blobs.items()},
        recipients=sum(b.addresses for b in blobs.values()),
        parts=split,
    )


class DomainEntry(Protocol):
    """A domain of domains.json (domain_facts.DomainFacts): its domain (the shard
    key) and its entry. One object per unchanged domain between renders."""

    domain: str

    def entry(self) -> dict[str, Any]: ...


def render_domain_shards(
    domains: Sequence[DomainEntry], raw_bytes: int, cache: RenderCache | None
) -> dict[str, bytes]:
    """domains.json's entries (sorted by domain) as gzip'd JSON lists by
    crc32(domain); raw_bytes: their size as compact JSON. With a cache, a
    shard fed the same domain objects as last time is not encoded again:
    one changed domain re-renders one shard."""
    count = shard_count(raw_bytes, DOMAIN_SHARD_RAW_BYTES)
    while True:
        files = _domain_shards(domains, count, cache)
        if files is not None:
            return files
        count *= 2  # a shard gzip'd over SHARD_MAX_BYTES


def _domain_shards(
    domains: Sequence[DomainEntry], count: int, cache: RenderCache | None
) -> dict[str, bytes] | None:
    groups: list[list[DomainEntry]] = [[] for _ in range(count)]
    for d in domains:
        groups[shard_of(d.domain, count)].append(d)
    previous = cache.domain_shards if cache is not None else {}
    made: dict[str, tuple[list[DomainEntry], bytes]] = {}
    for i, group in enumerate(groups):
        name = DOMAIN_SHARD.format(i, count)
        old = previous.get(name)
        if old is not None and same_objects(old[0], group):
            made[name] = (group, old[1])
            continue
        blob = gzip_chunks(entries_json(group, operator.methodcaller("entry")))
        if len(blob) > SHARD_MAX_BYTES:
            return None
        made[name] = (group, blob)
    if cache is not None:
        cache.domain_shards = made
    return {name: blob for name, (_, blob) in made.items()}


def same_objects(old: Sequence[object], new: Sequence[object]) -> bool:
    """The same objects in the same order: what a cached shard was made of is
    replaced, never changed, so identity says its contents did not change."""
    return len(old) == len(new) and all(map(operator.is_, old, new))


# Entries encoded at a time: their dicts and JSON, not a whole shard's (~12,000
# entries, ~7 MB at once at 100,000 domains, where a render peaks).
ENTRY_CHUNK = 1000
T = TypeVar("T")


def gzip_chunks(chunks: Iterable[bytes]) -> bytes:
    """gzip.compress(b"".join(chunks), compresslevel=6, mtime=0), byte for byte
    (which is zlib's gzip at level 6), without the joined text: deflate's
    output does not depend on how its input is cut."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    out = [z.compress(c) for c in chunks]
    out.append(z.flush())
    return b"".join(out)


def entries_json(group: Sequence[T], entry: Callable[[T], object]) -> Iterator[bytes]:
    """json.dumps([entry(d) for d in group], sort_keys=True, separators=(",", ":")),
    encoded, ENTRY_CHUNK entries at a time (not every entry's dict at once)."""
    yield b"["
    for start in range(0, len(group), ENTRY_CHUNK):
        entries = [entry(d) for d in group[start : start + ENTRY_CHUNK]]
        text = json.dumps(entries, sort_keys=True, separators=(",", ":"))
        yield (b"," if start else b"") + text[1:-1].encode()
    yield b"]"
