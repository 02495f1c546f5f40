"""Async DNS for every stage: DNSBL, RBL, PTR, SPF, MX and next-hop lookups.

One resolver per relay process, dnspython's asyncio resolver underneath,
answers cached by their TTL (clamped), per-query timeouts. Production and the
tests use this same code; the tests only point `nameservers` at a DNS server
on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.flags
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
            servers = [parse_nameserver(s) for s in policy.nameservers]
            r.nameservers = [h for h, _ in servers]
            # dnspython has one port for all servers; ours are the same in practice.
            r.port = servers[0][1]
        else:
            r = dns.asyncresolver.Resolver()
        r.timeout = policy.timeout
        r.lifetime = policy.timeout
        r.cache = None  # we keep our own cache with TTL clamping and negatives
        self._resolver = r
        self._cache: dict[tuple[str, str], tuple[float, DnsAnswer]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Future[DnsAnswer]] = {}

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
        except dns.resolver.NXDOMAIN:
            return DnsAnswer(name, rdtype, (), NEGATIVE_TTL, nxdomain=True)
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as e:
            raise DnsTempError(f"{name}/{rdtype}: {e.__class__.__name__}") from e
        except dns.exception.DNSException as e:
            raise DnsTempError(f"{name}/{rdtype}: {e}") from e
        if ans.rrset is None:
            return DnsAnswer(name, rdtype, (), NEGATIVE_TTL)
        ttl = min(max(float(ans.rrset.ttl), MIN_TTL), MAX_TTL)
        return DnsAnswer(name, rdtype, tuple(r.to_text() for r in ans.rrset), ttl)

    def clear_cache(self) -> None:
        self._cache.clear()
