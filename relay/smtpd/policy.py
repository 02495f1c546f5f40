"""The RCPT restriction chain and the relay decision.

Read RECIPIENT_RESTRICTIONS below to see the order; each restriction is one
small function. Postfix semantics (smtpd_check.c): the first restriction that
permits or rejects ends the chain; a reply marked defer_if_permit (a
temporary DNS failure) is remembered and only returned if nothing later
rejects. After a permit, the implicit reject_unlisted_recipient still runs
(Postfix's smtpd_reject_unlisted_recipient=yes).

A deliberate departure from Postfix: mynetworks clients skip the spam checks
but may still only relay to relay domains. Postfix's default
smtpd_relay_restrictions (permit_mynetworks before reject_unauth_destination)
lets them relay anywhere; a mistaken mynetworks (a pod CIDR, a SNATing load
balancer) has made many Kubernetes mail setups open relays, so here the relay
decision comes first, for everyone.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from relay.config import RelayConfig
from relay.smtpd.addresses import Address, is_fqdn, is_ip_literal, is_routed
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.session import Envelope, Reply, Session
from relay.smtpd.spf import SpfChecker, SpfOutcome


class Permit(enum.Enum):
    PERMIT = "permit"


PERMIT = Permit.PERMIT
Verdict = Reply | Permit | None  # None: no opinion (Postfix DUNNO), go on


@dataclass
class Transaction:
    """Per-message state the restrictions keep between recipients."""

    envelope: Envelope
    spf: SpfOutcome | None = None  # SPF runs once per transaction


@dataclass
class Check:
    """What one restriction looks at."""

    config: RelayConfig
    session: Session
    transaction: Transaction
    rcpt: Address
    dns: DnsChecks
    spf: SpfChecker
    # The restriction that decided, for logs and metrics.
    reasons: list[str] = field(default_factory=list)


Restriction = Callable[[Check], Awaitable[Verdict]]


def _rcpt_reply(code: int, status: str, rcpt: Address, text: str) -> Reply:
    return Reply(code, status, f"<{rcpt.original}>: {text}")


# --- the restrictions, in the order they run ---------------------------------


async def screen_enforce(c: Check) -> Verdict:
    """postscreen's enforce action: every RCPT gets the screen's reply."""
    screen = c.session.screen
    if screen.action == "enforce":
        return screen.reply or Reply(550, "5.5.1", "Protocol error")
    return None


async def relay_access(c: Check) -> Verdict:
    """reject_unauth_destination: only relay domains, and no sender-specified
    routing (% ! @, quoted local parts, source routes, IP literals)."""
    rcpt = c.rcpt
    if is_routed(rcpt) or is_ip_literal(rcpt.domain) or c.config.domain_of(rcpt.domain_key) is None:
        return _rcpt_reply(554, "5.7.1", rcpt, "Relay access denied")
    return None


async def unauth_pipelining(c: Check) -> Verdict:
    if c.config.restrictions.reject_unauth_pipelining and c.session.unauth_pipelining:
        return _rcpt_reply(
            503,
            "5.5.0",
            c.rcpt,
            "Recipient address rejected: Improper use of SMTP command pipelining",
        )
    return None


async def non_fqdn_recipient(c: Check) -> Verdict:
    domain = c.rcpt.domain
    if (
        c.config.restrictions.reject_non_fqdn_recipient
        and not is_ip_literal(domain)
        and not is_fqdn(domain)
    ):
        return _rcpt_reply(
            504, "5.5.2", c.rcpt, "Recipient address rejected: need fully-qualified address"
        )
    return None


async def unknown_recipient_domain(c: Check) -> Verdict:
    if not c.config.restrictions.reject_unknown_recipient_domain:
        return None
    return await c.dns.unknown_recipient_domain(c.rcpt.text, c.rcpt.domain_key)


async def permit_mynetworks(c: Check) -> Verdict:
    return PERMIT if c.session.trusted else None


async def client_access(c: Check) -> Verdict:
    """check_client_access cidr: the first matching entry decides."""
    action = client_access_action(c.config, c.session.client_ip)
    if action == "permit":
        return PERMIT
    if action == "reject":
        return Reply(554, "5.7.1", f"<{c.session.client_ip}>: Client host rejected: Access denied")
    return None


async def unknown_reverse_client_hostname(c: Check) -> Verdict:
    if not c.config.restrictions.reject_unknown_reverse_client_hostname:
        return None
    return await c.dns.unknown_reverse_client_hostname(c.session)


async def rbl_client(c: Check) -> Verdict:
    if not c.config.restrictions.rbl_clients:
        return None
    return await c.dns.rbl_client(c.session)


async def unlisted_recipient(c: Check) -> Verdict:
    """reject_unlisted_recipient: `listed` domains accept only their
    RecipientList addresses (or an `@domain` wildcard entry)."""
    domain = c.config.domain_of(c.rcpt.domain_key)
    if domain is None or domain.recipients == "any":
        return None
    table = c.config.recipients
    if c.rcpt.lookup_key in table or f"@{domain.name}" in table:
        return None
    return _rcpt_reply(
        550,
        "5.1.1",
        c.rcpt,
        "Recipient address rejected: User unknown in relay recipient table",
    )


async def spf(c: Check) -> Verdict:
    """spf-engine, once per transaction; its header is prepended once."""
    if not c.config.restrictions.spf.enabled:
        return None
    t = c.transaction
    if t.spf is None:
        t.spf = await c.spf.check(c.session, t.envelope.sender, c.rcpt.text)
        if t.spf.header:
            t.envelope.prepend_headers.append(t.spf.header)
    return t.spf.reply


RECIPIENT_RESTRICTIONS: tuple[Restriction, ...] = (
    screen_enforce,
    relay_access,  # smtpd_relay_restrictions, before everything else
    unauth_pipelining,
    non_fqdn_recipient,
    unknown_recipient_domain,
    permit_mynetworks,
    client_access,
    unknown_reverse_client_hostname,
    rbl_client,
    unlisted_recipient,
    spf,
)

# Runs even when an earlier restriction permitted (Postfix's implicit
# smtpd_reject_unlisted_recipient).
IMPLICIT_AFTER_PERMIT: tuple[Restriction, ...] = (unlisted_recipient,)


async def check_recipient(c: Check) -> Reply | None:
    """Runs the chain for one RCPT: None to accept, or the reply to send."""
    deferred: Reply | None = None
    ran: set[Restriction] = set()
    permitted = False
    for restriction in RECIPIENT_RESTRICTIONS:
        ran.add(restriction)
        verdict = await restriction(c)
        if verdict is None:
            continue
        c.reasons.append(restriction.__name__)
        if verdict is PERMIT:
            permitted = True
            break
        assert isinstance(verdict, Reply)
        if verdict.defer_if_permit:
            deferred = deferred or verdict
            continue
        return verdict
    if permitted:
        for restriction in IMPLICIT_AFTER_PERMIT:
            if restriction in ran:
                continue
            verdict = await restriction(c)
            if isinstance(verdict, Reply) and not verdict.defer_if_permit:
                c.reasons.append(restriction.__name__)
                return verdict
    return deferred


def client_access_action(config: RelayConfig, client_ip: str) -> str | None:
    """'permit', 'reject' or None, from the first clientAccess CIDR that matches."""
    if not config.client_access:
        return None
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    for entry in config.client_access:
        if ip.version == entry.network.version and ip in entry.network:
            return entry.action
    return None


def in_mynetworks(config: RelayConfig, client_ip: str) -> bool:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in config.mynetworks)
