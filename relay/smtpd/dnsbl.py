"""DNSBL lookups and scoring with Postfix's semantics (postscreen_dnsbl_sites,
reject_rbl_client).

A site is `zone=filter*weight`. The filter is d.d.d.d where each d is a number
or [a;b..c] (a list of numbers and ranges). A site entry adds its weight once
when any reply matches its filter; negative weights allowlist. Entries of one
zone share one DNS query.

Which replies may count at all (the safety rules):
  - 127.255.255.0/24 never counts: Spamhaus answers 127.255.255.252/254/255
    for a typo'd zone, a query through a public resolver, or too many
    queries. Counting those would block every client.
  - anything outside 127.0.0.0/8 never counts (a wildcarded, expired zone
    answering with a parking address);
  - without a filter, only 127.0.0.0/24 counts. An explicit filter may name
    other 127/8 codes (dnswl.org answers 127.0.X.Y).
  - a list that lists the RFC 5782 test address 127.0.0.1 (which must never be
    listed) is broken: reported, and its answers ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from relay import metrics
from relay.config import DnsblSite
from relay.dns import DnsAnswer, DnsTempError, Resolver, reverse_ip

log = logging.getLogger("mailrelay.dnsbl")

# postscreen_dnsbl_min_ttl / postscreen_dnsbl_max_ttl
MIN_TTL = 60.0
MAX_TTL = 3600.0
# The RFC 5782 test entry that must never be listed.
NEVER_LISTED_PROBE = "1.0.0.127"
# How often one zone's trouble is logged (the metric counts every time).
REPORT_INTERVAL = 600.0

_ERROR_NET = ipaddress.ip_network("127.255.255.0/24")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_DEFAULT_NET = ipaddress.ip_network("127.0.0.0/24")

SPAMHAUS_ERRORS = {
    "127.255.255.252": "typing error in the DNSBL name",
    "127.255.255.254": "query via a public/open resolver (use a local resolver or a DQS key)",
    "127.255.255.255": "excessive number of queries",
}


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class ReplyFilter:
    """d.d.d.d with each d a set of (low, high) ranges."""

    text: str
    octets: tuple[tuple[tuple[int, int], ...], ...]

    def matches(self, address: str) -> bool:
        parts = address.split(".")
        if len(parts) != 4:
            return False
        try:
            values = [int(p) for p in parts]
        except ValueError:
            return False
        return all(
            any(lo <= v <= hi for lo, hi in ranges)
            for v, ranges in zip(values, self.octets, strict=True)
        )


def _octet(text: str) -> int:
    if not text.isdigit() or int(text) > 255:
        raise FilterError(f"bad number {text!r}")
    return int(text)


def parse_filter(text: str) -> ReplyFilter:
    """'127.0.0.[2;4..7]' -> ReplyFilter; raises FilterError."""
    text = text.strip()
    parts: list[str] = []
    depth, cur = 0, ""
    for c in text:  # split on dots outside brackets ("[2..7]" has dots inside)
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        if c == "." and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    if len(parts) != 4 or depth != 0:
        raise FilterError(f"not d.d.d.d: {text!r}")
    octets: list[tuple[tuple[int, int], ...]] = []
    for p in parts:
        if p.startswith("[") and p.endswith("]"):
            ranges: list[tuple[int, int]] = []
            for item in p[1:-1].split(";"):
                lo, sep, hi = item.partition("..")
                a = _octet(lo)
                b = _octet(hi) if sep else a
                if b < a:
                    raise FilterError(f"empty range {item!r} in {text!r}")
                ranges.append((a, b))
            octets.append(tuple(ranges))
        else:
            v = _octet(p)
            octets.append(((v, v),))
    return ReplyFilter(text, tuple(octets))


def is_error_code(address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in _ERROR_NET
    except ValueError:
        return False


def reply_counts(address: str, reply_filter: ReplyFilter | None) -> bool:
    """Whether one A record of a DNSBL answer counts for this filter (see the module doc)."""
    try:
        addr = ipaddress.ip_address(address)
    except ValueError:
        return False
    if addr in _ERROR_NET or addr not in _LOOPBACK:
        return False
    if reply_filter is None:
        return addr in _DEFAULT_NET
    return reply_filter.matches(address)


@dataclass(frozen=True)
class SiteEntry:
    zone: str
    reply_filter: ReplyFilter | None
    weight: int

    @property
    def text(self) -> str:
        f = f"={self.reply_filter.text}" if self.reply_filter else ""
        return f"{self.zone}{f}*{self.weight}"


def site_entries(sites: Iterable[DnsblSite]) -> list[SiteEntry]:
    """Config sites -> entries; a site with several returnCodes gives one entry per code
    (Postfix: one pattern each); a bad filter is skipped with a warning."""
    out: list[SiteEntry] = []
    for s in sites:
        codes = s.return_codes or (None,)
        for code in codes:
            try:
                f = parse_filter(code) if code else None
            except FilterError as e:
                log.warning("DNSBL site %s: ignoring bad reply filter: %s", s.zone, e)
                continue
            out.append(SiteEntry(s.zone.lower().rstrip("."), f, s.weight))
    return out


@dataclass
class ZoneAnswer:
    """One zone's answer for one client."""

    zone: str
    addresses: tuple[str, ...] = ()
    ttl: float = MIN_TTL
    failed: str = ""  # a DNS error: no opinion
    refused: str = ""  # the list answered with an error code, or is broken


@dataclass
class Score:
    total: int = 0
    name: str | None = None  # the zone of the highest-weight match (Postfix dnsbl_name)
    ttl: float = MIN_TTL
    complete: bool = True  # every zone answered before the score was taken
    matched: list[str] = field(default_factory=list)  # "zone=filter*weight" entries that hit


class ZoneHealth:
    """Remembers which lists misbehave, to log each problem once in a while."""

    def __init__(self) -> None:
        self._last_report: dict[tuple[str, str], float] = {}

    def report(self, zone: str, problem: str) -> None:
        kind = problem.split(":")[0]  # "error answer" or "broken" (query_zone): bounded
        metrics.child(metrics.DNSBL_ERRORS, zone, kind).inc()
        key = (zone, problem)
        now = time.monotonic()
        if now - self._last_report.get(key, -REPORT_INTERVAL) >= REPORT_INTERVAL:
            self._last_report[key] = now
            log.warning("DNSBL %s not obeyed: %s", zone, problem)


HEALTH = ZoneHealth()


async def query_zone(resolver: Resolver, zone: str, client_ip: str) -> ZoneAnswer:
    """The A records of client_ip in zone, with the broken-list probe beside it."""
    name = f"{reverse_ip(client_ip)}.{zone}"
    probe = f"{NEVER_LISTED_PROBE}.{zone}"
    cached, cached_probe = resolver.cached(name, "A"), resolver.cached(probe, "A")
    answer: DnsAnswer | BaseException
    probe_answer: DnsAnswer | BaseException
    if cached is not None and cached_probe is not None:  # the usual case: no tasks
        answer, probe_answer = cached, cached_probe
    else:
        answer, probe_answer = await asyncio.gather(
            resolver.query(name, "A"), resolver.query(probe, "A"), return_exceptions=True
        )
    if isinstance(answer, BaseException):
        if not isinstance(answer, DnsTempError):
            raise answer
        return ZoneAnswer(zone, failed=str(answer))
    za = ZoneAnswer(zone, answer.records, answer.ttl)
    errors = [a for a in answer.records if is_error_code(a)]
    if errors:
        why = SPAMHAUS_ERRORS.get(errors[0], "error code")
        za.refused = f"error answer: {errors[0]} ({why})"
    elif not isinstance(probe_answer, BaseException) and probe_answer.records:
        first = probe_answer.records[0]
        if is_error_code(first):
            why = SPAMHAUS_ERRORS.get(first, "error code")
            za.refused = f"error answer: {first} ({why})"
        else:
            za.refused = f"broken: lists the test address 127.0.0.1 ({first})"
    if za.refused:
        HEALTH.report(zone, za.refused)
    return za


def clamp_ttl(ttl: float) -> float:
    return min(max(ttl, MIN_TTL), MAX_TTL)


def score(entries: list[SiteEntry], answers: dict[str, ZoneAnswer]) -> Score:
    """Postfix psc_dnsbl_receive + retrieve: the combined score of the answers in.

    The TTL follows Postfix: of a failing client, the smallest TTL among the
    answers that made it fail; of a passing one, among the answers that let it
    pass; clamped to [60 s, 1 h].
    """
    result = Score()
    zones = {e.zone for e in entries}
    result.complete = zones <= answers.keys()
    fail_ttl = pass_ttl = -1.0
    best_weight = 0

    def lower(cur: float, ttl: float) -> float:
        return ttl if cur < 0 or ttl < cur else cur

    hit_zones: set[str] = set()
    for e in entries:
        za = answers.get(e.zone)
        if za is None or za.failed or za.refused:
            continue
        if za.addresses:
            if any(reply_counts(a, e.reply_filter) for a in za.addresses):
                if result.name is None or best_weight < e.weight:
                    result.name, best_weight = e.zone, e.weight
                result.total += e.weight
                result.matched.append(e.text)
                hit_zones.add(e.zone)
            if e.weight > 0:
                fail_ttl = lower(fail_ttl, za.ttl)
            else:
                pass_ttl = lower(pass_ttl, za.ttl)
        elif e.weight > 0:
            pass_ttl = lower(pass_ttl, za.ttl)
        else:
            fail_ttl = lower(fail_ttl, za.ttl)
    result.ttl = clamp_ttl(fail_ttl if result.total > 0 else pass_ttl)
    for zone in hit_zones:  # configured zones only: bounded
        metrics.child(metrics.DNSBL_HITS, zone).inc()
    return result


async def listed(
    resolver: Resolver, zone: str, client_ip: str, reply_filter: ReplyFilter | None
) -> tuple[str, ...] | None:
    """For reject_rbl_client: the matching A records, or None when not listed.

    A DNS failure or a misbehaving list counts as not listed (logged)."""
    za = await query_zone(resolver, zone, client_ip)
    if za.failed:
        log.info("RBL %s lookup for %s failed: %s", zone, client_ip, za.failed)
        return None
    if za.refused:
        return None
    hits = tuple(a for a in za.addresses if reply_counts(a, reply_filter))
    if hits:
        metrics.child(metrics.DNSBL_HITS, zone).inc()
    return hits or None
