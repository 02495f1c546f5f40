"""Async DNS for every stage: DNSBL, RBL, PTR, SPF, MX and next-hop lookups.

One resolver per relay process, dnspython's asyncio resolver underneath,
answers cached by their TTL (clamped), per-query timeouts. Production and the
tests use this same code; the tests only point `nameservers` at a DNS server
on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.nameserver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from relay.config import DnsPolicy

# Cache bounds: keep lookups between these, whatever the zone says.
MIN_TTL = 0.0
MAX_TTL = 3600.0
NEGATIVE_TTL = 60.0
CACHE_MAX_ENTRIES = 100_000


class DnsTempError(Exception):
    """A lookup that failed temporarily (timeout, SERVFAIL): callers defer."""


@dataclass(frozen=True)
class DnsAnswer:
    """A lookup's outcome. `records` empty with `exists` False: NXDOMAIN/NODATA."""

    name: str
    rdtype: str
    records: tuple[str, ...]  # text form of each record (e.g. "10 mx.example.com.")
    ttl: float
    nxdomain: bool = False

    @property
    def exists(self) -> bool:
        return bool(self.records)


def parse_nameserver(text: str) -> tuple[str, int]:
    """'ip' or 'ip:port' or '[v6]:port' -> (ip, port)."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
        return host, int(port or 53)
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, 53


class Resolver:
    """Cached async DNS lookups."""

    def __init__(self, policy: DnsPolicy | None = None) -> None:
        policy = policy or DnsPolicy()
        if policy.nameservers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in (parse_nameserver(s) for s in policy.nameservers)
            ]
        else:
            r = dns.asyncresolver.Resolver()
        r.timeout = policy.timeout
        r.lifetime = policy.timeout
        r.cache = None  # we keep our own cache with TTL clamping and negatives
        self._resolver = r
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}

    def cached(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The answer query() would give without going to the network, or None.

        For hot paths that would otherwise schedule tasks just to read the cache."""
        hit = self._cache.get((name.lower().rstrip("."), rdtype.upper()))
        if hit and hit[0] > time.monotonic():
            return hit[1]
        return None

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Looks up name/rdtype; raises DnsTempError on timeout or server failure."""
        key = (name.lower().rstrip("."), rdtype.upper())
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit and hit[0] > now:
            return hit[1]
        if key in self._inflight:  # one query on the wire per name at a time
            return await asyncio.shield(self._inflight[key])
        fut: asyncio.Future[DnsAnswer] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer = await self._lookup(*key)
            fut.set_result(answer)
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()  # crude but bounded; a flood cannot grow it
            self._cache[key] = (now + answer.ttl, answer)
            return answer
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved
            raise
        finally:
            del self._inflight[key]

    async def _lookup(self, name: str, rdtype: str) -> DnsAnswer:
        try:
            ans = await self._resolver.resolve(
                name + ".", dns.rdatatype.from_text(rdtype), raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN as e:
            ttl = NEGATIVE_TTL
            for response in e.responses().values():
                ttl = _negative_ttl(response)
            return DnsAnswer(name, rdtype, (), ttl, nxdomain=True)
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as e:
            raise DnsTempError(f"{name}/{rdtype}: {e.__class__.__name__}") from e
        except dns.exception.DNSException as e:
            raise DnsTempError(f"{name}/{rdtype}: {e}") from e
        if ans.rrset is None:
            return DnsAnswer(name, rdtype, (), _negative_ttl(ans.response))
        ttl = min(max(float(ans.rrset.ttl), MIN_TTL), MAX_TTL)
        return DnsAnswer(name, rdtype, tuple(r.to_text() for r in ans.rrset), ttl)


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308: a negative answer lives min(SOA TTL, SOA minimum); 60 s without a SOA."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                soa = rrset[0]
                return min(max(float(min(rrset.ttl, soa.minimum)), MIN_TTL), MAX_TTL)
    return NEGATIVE_TTL


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(addr: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d, a client on a dual-stack
    socket) as the IPv4 address it carries: what every list and network check
    must compare."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=16384)  # every RBL/DNSBL/PTR check of a client parses it again
def reverse_ip(ip: str) -> str:
    """The DNSBL/PTR form of an address: '1.2.3.4' -> '4.3.2.1', IPv6 as nibbles."""
    addr = unmapped(ipaddress.ip_address(ip))
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


@functools.lru_cache(maxsize=16384)  # the PTR check of every message of a client
def ptr_name(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address."""
    addr = unmapped(ipaddress.ip_address(ip))
    suffix = "in-addr.arpa" if isinstance(addr, ipaddress.IPv4Address) else "ip6.arpa"
    return f"{reverse_ip(str(addr))}.{suffix}"


def txt_strings(record: str) -> list[bytes]:
    """The character-strings of one TXT record given in text form."""
    rd = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, record)
    return list(rd.strings)  # type: ignore[attr-defined]


def txt_text(record: str) -> str:
    """One TXT record as a readable line: strings joined, non-printables dropped."""
    raw = b"".join(txt_strings(record)).decode("utf-8", "replace")
    return "".join(c for c in raw if c.isprintable())
