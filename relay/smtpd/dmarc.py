"""DMARC (RFC 7489) of a message's From domain, as OpenDMARC evaluates it.

The policy record is looked up at `_dmarc.<From domain>`, then at
`_dmarc.<organizational domain>` (the public-suffix list from Debian's
`publicsuffix` package decides where that is; `sp=` applies there). The
message passes when a DKIM signature that verified, or SPF's MAIL FROM
result (when the SPF check ran at RCPT), is aligned with the From domain:
the same domain (`adkim=s`, `aspf=s`) or the same organizational domain
(relaxed, the default). `pct=` below 100 applies the next milder policy to
the rest of the mail, as RFC 7489 6.6.4 says.

The lookups go through the relay's async resolver (relay.dns): a temporary
DNS failure is `temperror`, which is reported and never enforced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList

from relay.dns import DnsTempError, Resolver, txt_strings

log = logging.getLogger("mailrelay.auth")

# Debian's publicsuffix package (hack/setup.sh, Dockerfile.relay); the copy
# bundled with the publicsuffixlist module when it is missing.
PUBLIC_SUFFIX_LIST = "/usr/share/publicsuffix/public_suffix_list.dat"
POLICIES = ("none", "quarantine", "reject")
MAX_FROM_DOMAINS = 5  # more (each costs up to two lookups) is a permerror


@functools.cache
def public_suffixes() -> PublicSuffixList:
    """The public-suffix list, read once per process (blocking: call it in an executor)."""
    try:
        with open(PUBLIC_SUFFIX_LIST, "rb") as f:
            return PublicSuffixList(f)
    except OSError as e:
        log.warning(
            "no public-suffix list at %s (%s): using the bundled one", PUBLIC_SUFFIX_LIST, e
        )
        return PublicSuffixList()


_loaded: PublicSuffixList | None = None


async def load_public_suffixes() -> PublicSuffixList:
    """The list, read in an executor the first time."""
    global _loaded
    if _loaded is None:
        _loaded = await asyncio.get_running_loop().run_in_executor(None, public_suffixes)
    return _loaded


def organizational_domain(psl: PublicSuffixList, domain: str) -> str:
    """example.co.uk for mail.example.co.uk; a name under no known suffix is its own."""
    return psl.privatesuffix(domain) or domain


@dataclass(frozen=True)
class Record:
    """A DMARC record's tags that decide the result."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


def parse_record(text: str) -> Record | None:
    """A TXT record as a DMARC record (v=DMARC1 first), or None when it is not one.
    A missing or unknown p= is p=none when rua= is given (RFC 7489 6.6.3)."""
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if i == 0 and (name != "v" or value != "DMARC1"):
            return None
        if eq and name:
            tags.setdefault(name, value.lower())
    p = tags.get("p", "")
    if p not in POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", p)
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100
    return Record(
        p=p,
        sp=sp if sp in POLICIES else p,
        adkim="s" if tags.get("adkim") == "s" else "r",
        aspf="s" if tags.get("aspf") == "s" else "r",
        pct=pct,
    )


async def lookup(resolver: Resolver, domain: str) -> Record | None:
    """The one DMARC record at _dmarc.<domain> (none, or several: None).
    Raises DnsTempError."""
    answer = await resolver.query(f"_dmarc.{domain}", "TXT")
    found = []
    for r in answer.records:
        record = parse_record(b"".join(txt_strings(r)).decode("utf-8", "replace"))
        if record is not None:
            found.append(record)
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True)
class DmarcResult:
    """What the header reports: dmarc=<result> (p=<policy> dis=<disposition>) header.from=."""

    result: str  # pass | fail | none | temperror | permerror
    domain: str  # header.from
    policy: str = ""  # the published policy that applies (p= or sp=)
    disposition: str = "none"  # what the policy asks for this message (after pct)
    comment: str = ""

    @property
    def rank(self) -> int:
        """Which of several From domains' results the header reports: the worst."""
        if self.result == "fail":
            return 10 + POLICIES.index(self.disposition)
        return {"temperror": 3, "permerror": 2, "pass": 1}.get(self.result, 0)


def from_domains(values: list[str]) -> list[str] | None:
    """The domains of the From header fields, or None when an address has none."""
    domains: list[str] = []
    for _name, address in getaddresses(values):
        domain = address.rpartition("@")[2].strip().lower().rstrip(".")
        if "@" not in address or not domain:
            return None
        if domain not in domains:
            domains.append(domain)
    return domains


def _aligned(psl: PublicSuffixList, mode: str, domain: str, other: str) -> bool:
    other = other.lower().rstrip(".")
    if mode == "s":
        return other == domain
    return organizational_domain(psl, other) == organizational_domain(psl, domain)


def _disposition(policy: str, pct: int) -> str:
    """pct= sampling: the mail outside the percentage gets the next milder policy."""
    if pct >= 100 or random.randrange(100) < pct:
        return policy
    return {"reject": "quarantine"}.get(policy, "none")


@dataclass(frozen=True)
class Evidence:
    """What DMARC aligns with the From domain."""

    dkim_pass: tuple[str, ...] = ()  # d= of the DKIM signatures that verified
    dkim_temperror: tuple[str, ...] = ()  # d= of those whose key lookup failed for now
    spf: tuple[str, str] | None = None  # (result, MAIL FROM domain) when SPF ran


async def evaluate(resolver: Resolver, domain: str, evidence: Evidence) -> DmarcResult:
    """One From domain's result. A fail that an aligned signature could have
    turned into a pass, had its key lookup not failed, is a temperror."""
    psl = await load_public_suffixes()
    org = organizational_domain(psl, domain)
    try:
        record = await lookup(resolver, domain)
        policy = record.p if record is not None else ""
        if record is None and org != domain:
            record = await lookup(resolver, org)
            policy = record.sp if record is not None else ""
    except DnsTempError as e:
        return DmarcResult("temperror", domain, comment=f"DNS: {e}")
    if record is None:
        return DmarcResult("none", domain)
    aligned = any(_aligned(psl, record.adkim, domain, d) for d in evidence.dkim_pass)
    spf = evidence.spf
    if spf is not None and spf[0] == "pass" and spf[1]:
        aligned = aligned or _aligned(psl, record.aspf, domain, spf[1])
    if aligned:
        return DmarcResult("pass", domain, policy)
    if any(_aligned(psl, record.adkim, domain, d) for d in evidence.dkim_temperror):
        return DmarcResult("temperror", domain, policy, comment="DKIM key query failed")
    return DmarcResult("fail", domain, policy, _disposition(policy, record.pct))


async def check(resolver: Resolver, from_values: list[str], evidence: Evidence) -> DmarcResult:
    """The message's DMARC result from its From header fields; with several
    From domains each is evaluated and the worst counts (RFC 7489 6.6.1)."""
    domains = from_domains(from_values)
    if not domains:
        return DmarcResult("permerror", "", comment="no From domain")
    if len(domains) > MAX_FROM_DOMAINS:
        return DmarcResult("permerror", domains[0], comment="too many From domains")
    results = await asyncio.gather(*(evaluate(resolver, d, evidence) for d in domains))
    return max(results, key=lambda r: r.rank)
