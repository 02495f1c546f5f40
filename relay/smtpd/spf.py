"""SPF at RCPT, as spf-engine (pypolicyd-spf) does it.

`check()` runs once per message transaction (the caller caches the outcome
for the later recipients): a Reply to reject/defer, or a header to prepend
once (Received-SPF, or spf-engine's X-Comment for skipped clients).

spf-engine's order: the HELO identity first (pyspf query with
s=postmaster@helo); a HELO result that rejects or defers answers at once.
Then MAIL FROM; for the null sender the HELO result stands in. Reply texts
follow spf-engine: `550 5.7.23 <rcpt>: Recipient address rejected: Message
rejected due to: <pyspf explanation>. Please see <url>` (5.7.24 for
Permerror/Temperror), and `450 4.7.24 ...deferred...` as defer_if_permit.

pyspf is synchronous and does its own DNS through the module-level
`spf.DNSLookup`. Instead of blocking a thread per lookup, pyspf runs here
against answers we already have: the hook raises when an answer is missing,
we fetch the missing names with the async resolver (relay.dns, cached by
TTL), and run pyspf again. An SPF evaluation is cheap CPU next to DNS, it
needs at most a handful of rounds, and a slow domain only ever waits on an
awaited DNS query, so it never stalls other sessions or ties up threads.

An outcome is remembered with the records it was computed from, and given
again for the same client, sender and HELO while the resolver's cache still
holds those records: pyspf's run is most of the stage's CPU, and a client asks
the same questions for every message.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import spf as pyspf

from relay import metrics
from relay.config import RelayConfig, SpfPolicy
from relay.dns import DnsTempError, Resolver, txt_strings
from relay.smtpd.session import Reply, Session, SpfOutcome

log = logging.getLogger("mailrelay.spf")

LOOKUP_TIME = 20.0  # spf-engine Lookup_Time: one identity's whole evaluation
VOID_LIMIT = 2  # spf-engine Void_Limit
MAX_ROUNDS = 40  # pyspf's own limits (10 DNS mechanisms, 10 MX/PTR names) keep it far below
# spf-engine 2.9.2's _rejectmessage puts data['recipient'] in r=, and with its
# default Hide_Receiver=Yes policyd_spf.py has replaced that with '<UNKNOWN>'
# before any check runs (as in receiver= of Received-SPF): so r=<UNKNOWN>, not
# the recipient nor its domain.
WHY_URL = "http://www.openspf.net/Why?s={scope};id={identity};ip={ip};r=<UNKNOWN>"

# Results each *_reject setting rejects (spf-engine _get_resultcodes).
REJECTS: dict[str, frozenset[str]] = {
    "Fail": frozenset({"Fail"}),
    "Null": frozenset({"Fail"}),
    "Softfail": frozenset({"Fail", "Softfail"}),
    "SPF_Not_Pass": frozenset({"Fail", "Softfail", "Neutral"}),
    "False": frozenset(),
    "No_Check": frozenset(),
}


# --- pyspf's DNS, answered from what we fetched --------------------------------------


class _NeedDns(BaseException):
    """Raised inside pyspf when an answer is not fetched yet (BaseException: pyspf
    catches Exception in places; we also record the need, in case it is swallowed)."""


DnsKey = tuple[str, str]  # (name, qtype), as the resolver's cache keys them


@dataclass
class _Answers:
    known: dict[DnsKey, list[tuple[tuple[str, str], Any]] | str]
    missing: list[DnsKey]
    resolver: Resolver | None = None  # answers already in its cache need no round
    # The resolver's records behind each answer in `known`, and the answers the
    # last pyspf run asked for: what a remembered result depends on.
    records: dict[DnsKey, tuple[str, ...]] = field(default_factory=dict)
    used: dict[DnsKey, tuple[str, ...]] = field(default_factory=dict)
    # An answer that was an error, or a record with a time macro: not remembered.
    volatile: bool = False


_current: contextvars.ContextVar[_Answers | None] = contextvars.ContextVar(
    "mailrelay_spf_answers", default=None
)
_original_lookup: Callable[..., Any] = pyspf.DNSLookup
_TEXT_TYPES = frozenset({"TXT", "SPF"})
_TIME_MACRO = re.compile(r"%\{t", re.IGNORECASE)


def _lookup_hook(name: str, qtype: str, *args: Any, **kwargs: Any) -> Any:
    answers = _current.get()
    if answers is None:  # someone else's pyspf use in this process
        return _original_lookup(name, qtype, *args, **kwargs)
    key = (name.lower().rstrip("."), qtype.upper())
    found = answers.known.get(key)
    if found is None and answers.resolver is not None:
        # The same answer the next round would fetch, without another round.
        hit = answers.resolver.cached(*key)
        if hit is not None:
            found = answers.known[key] = _convert(*key, hit.records)
            answers.records[key] = hit.records
    if found is None:
        answers.missing.append(key)
        raise _NeedDns(key)
    if isinstance(found, str):
        answers.volatile = True
        raise pyspf.TempError(found)
    records = answers.used[key] = answers.records[key]
    if key[1] in _TEXT_TYPES and any(_TIME_MACRO.search(r) for r in records):
        answers.volatile = True  # %{t}: the result changes with the clock
    return found


pyspf.DNSLookup = _lookup_hook


def _convert(name: str, qtype: str, records: tuple[str, ...]) -> list[tuple[tuple[str, str], Any]]:
    """Our answer's text records -> pyspf's DNSLookup result format (a fresh list)."""
    return list(_convert_cached(name, qtype, records))


@functools.lru_cache(maxsize=4096)  # parsing TXT text is most of an SPF check's CPU
def _convert_cached(
    name: str, qtype: str, records: tuple[str, ...]
) -> tuple[tuple[tuple[str, str], Any], ...]:
    key = (name, qtype)
    out: list[tuple[tuple[str, str], Any]] = []
    for r in records:
        if qtype in ("A", "AAAA"):
            out.append((key, r))
        elif qtype == "MX":
            pref, _, exchange = r.partition(" ")
            out.append((key, (int(pref), exchange.rstrip("."))))
        elif qtype == "PTR":
            out.append((key, r.rstrip(".")))
        elif qtype in ("TXT", "SPF"):
            out.append((key, tuple(txt_strings(r))))
    return tuple(out)


async def _fetch(resolver: Resolver, key: DnsKey, answers: _Answers) -> list[Any] | str:
    name, qtype = key
    try:
        answer = await resolver.query(name, qtype)
    except DnsTempError as e:
        return f"DNS {e}"
    answers.records[key] = answer.records
    return _convert(name, qtype, answer.records)


@dataclass(frozen=True)
class _Remembered:
    """An evaluation's outcome and the DNS records it was computed from."""

    outcome: tuple[str, str]
    records: tuple[tuple[DnsKey, tuple[str, ...]], ...]

    def still_valid(self, resolver: Resolver) -> bool:
        """pyspf is a function of its inputs and its DNS answers (querytime=0:
        no clock, bar %{t}, never remembered): while the resolver's cache holds
        the same records, it would come to the same outcome."""
        for key, records in self.records:
            hit = resolver.cached(*key)
            if hit is None or hit.records != records:
                return False
        return True


# Outcomes by (ip, sender, helo): a client's every message asks the same two
# questions, and pyspf's run is most of the SPF stage's CPU.
_remembered: dict[tuple[str, str, str], _Remembered] = {}
REMEMBERED_MAX = 4096


async def evaluate(resolver: Resolver, ip: str, sender: str, helo: str) -> tuple[str, str]:
    """pyspf's (result, explanation) for one identity, e.g. ('fail', 'SPF fail - not
    authorized'); DNS through `resolver`. Temperror when LOOKUP_TIME runs out."""
    question = (ip, sender, helo)
    known = _remembered.get(question)
    if known is not None and known.still_valid(resolver):
        return known.outcome
    answers = _Answers({}, [], resolver)
    try:
        async with asyncio.timeout(LOOKUP_TIME):
            for _round in range(MAX_ROUNDS):
                answers.missing = []
                answers.used = {}
                pyspf.MAX_VOID_LOOKUPS = VOID_LIMIT
                query = pyspf.query(i=ip, s=sender, h=helo, querytime=0)
                token = _current.set(answers)
                try:
                    result, _code, explanation = query.check()
                except _NeedDns:
                    pass
                finally:
                    _current.reset(token)
                if not answers.missing:
                    if not answers.volatile:
                        if len(_remembered) >= REMEMBERED_MAX:
                            _remembered.clear()  # crude but bounded, as the resolver's cache
                        _remembered[question] = _Remembered(
                            (result, explanation), tuple(answers.used.items())
                        )
                    return result, explanation
                needed = list(dict.fromkeys(answers.missing))
                fetched = await asyncio.gather(*(_fetch(resolver, k, answers) for k in needed))
                answers.known.update(zip(needed, fetched, strict=True))
    except TimeoutError:
        return "temperror", "SPF Temporary Error: DNS Timeout"
    return "temperror", "SPF Temporary Error: too many DNS rounds"


# --- spf-engine's policy ----------------------------------------------------------------


RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror"})


def count_result(identity: str, result: str) -> None:
    """mailrelay_spf_results_total; anything outside RFC 7208's results is `permerror`."""
    result = result.lower()
    metrics.child(metrics.SPF, identity, result if result in RESULTS else "permerror").inc()


@functools.lru_cache(maxsize=4096)  # once per client and skipAddresses, not per message
def _in(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


# What to do with one identity's result (spf-engine): refuse, defer
# (defer_if_permit), or only prepend the Received-SPF header; dunno: nothing.
SpfAction = Literal["reject", "defer", "prepend", "dunno"]


def _action(policy_value: str, result: str, policy: SpfPolicy) -> SpfAction:
    """One identity's action (spf-engine _get_resultcodes)."""
    if policy_value == "False":
        return "prepend"
    if result in REJECTS.get(policy_value, frozenset()):
        return "reject"
    if result == "Temperror" and policy.temp_error_defer:
        return "defer"
    if result == "Permerror" and policy.perm_error_reject:
        return "reject"
    return "prepend"


class SpfChecker:
    def __init__(self, config: RelayConfig, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver

    def update_config(self, config: RelayConfig) -> None:
        self.config = config

    async def check(self, session: Session, sender: str, recipient: str) -> SpfOutcome:
        policy = self.config.restrictions.spf
        if not policy.enabled:
            return SpfOutcome()
        ip = session.client_ip
        helo = session.helo or ""
        if _in(ip, policy.skip_addresses):
            return SpfOutcome(
                header="X-Comment: SPF check N/A for local connections - "
                f"client-ip={ip}; helo={helo or '<UNKNOWN>'}; envelope-from={sender}; "
                "receiver=<UNKNOWN> "
            )
        if not helo and not sender:
            return SpfOutcome()
        if not helo:  # spf-engine: no HELO, use the sender's domain
            helo = sender.rpartition("@")[2] if "@" in sender else "unknown"
        header_sender = sender or "<>"
        header = ""
        helo_result = "None"
        helo_action: SpfAction = "prepend"

        if policy.helo_reject != "No_Check":
            result, explanation = await evaluate(self.resolver, ip, "postmaster@" + helo, helo)
            count_result("helo", result)
            helo_result = result.capitalize()
            if helo_result == "None":
                explanation = "no SPF record"
            header = self._header(helo_result, explanation, "helo", ip, helo, header_sender)
            if policy.helo_reject == "Null" and sender:
                helo_action = "dunno"
            else:
                helo_action = _action(policy.helo_reject, helo_result, policy)
            if helo_action in ("reject", "defer"):
                return self._refuse(
                    helo_action, helo_result, explanation, "helo", helo, session, recipient
                )

        if not sender:  # the null sender: the HELO result stands
            evaluated = policy.helo_reject != "No_Check"
            return SpfOutcome(
                header=header or None,
                result=helo_result.lower() if evaluated else "",
                domain=helo if evaluated else "",
            )
        if policy.mail_from_reject == "No_Check":
            return SpfOutcome(header=header or None)

        result, explanation = await evaluate(self.resolver, ip, sender, helo)
        count_result("mailfrom", result)
        mfrom_result = result.capitalize()
        if mfrom_result == "None":
            explanation = "no SPF record"
        if mfrom_result != "None" or helo_result == "None":
            header = self._header(mfrom_result, "mailfrom", "mailfrom", ip, helo, sender)
        action = _action(policy.mail_from_reject, mfrom_result, policy)
        if action in ("reject", "defer"):
            return self._refuse(
                action, mfrom_result, explanation, "mfrom", sender, session, recipient
            )
        log.debug("SPF %s for %s from [%s]", mfrom_result, sender, ip)
        domain = sender.rpartition("@")[2].lower()
        return SpfOutcome(header=header or None, result=mfrom_result.lower(), domain=domain)

    @staticmethod
    def _header(result: str, comment: str, identity: str, ip: str, helo: str, sender: str) -> str:
        return (
            f"Received-SPF: {result} ({comment}) identity={identity}; client-ip={ip}; "
            f"helo={helo}; envelope-from={sender}; receiver=<UNKNOWN> "
        )

    @staticmethod
    def _refuse(
        action: SpfAction,
        result: str,
        explanation: str,
        scope: str,
        identity: str,
        session: Session,
        recipient: str,
    ) -> SpfOutcome:
        error = result in ("Permerror", "Temperror")
        url = WHY_URL.format(scope=scope, identity=identity, ip=session.client_ip)
        verb = "rejected" if action == "reject" else "deferred"
        text = (
            f"<{recipient}>: Recipient address rejected: "
            f"Message {verb} due to: {explanation}. Please see {url}"
        )
        if action == "reject":
            reply = Reply(550, "5.7.24" if error else "5.7.23", text)
        else:
            reply = Reply(450, "4.7.24", text, defer_if_permit=True)
        log.info(
            "SPF %s from [%s]: %s; %s (%s)",
            action,
            session.client_ip,
            reply,
            result,
            scope,
        )
        return SpfOutcome(reply=reply)
