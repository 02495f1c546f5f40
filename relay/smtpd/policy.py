"""The restrictions of every SMTP stage, and the relay decision.

Each stage has its table, like Postfix's smtpd_*_restrictions; read the
tables below to see what runs where and in which order. Each restriction is
one small function of a Check:

  CONNECT      CLIENT_RESTRICTIONS     after postscreen, before the greeting
  HELO         HELO_RESTRICTIONS       HELO and EHLO
  MAIL         SENDER_RESTRICTIONS     after MAIL FROM and its parameters parse
  RCPT         RECIPIENT_RESTRICTIONS  after RCPT TO parses
  DATA         DATA_RESTRICTIONS       before the 354
  END-OF-DATA  END_OF_DATA_RESTRICTIONS  after the final dot, before the queue commit

As with Postfix's default smtpd_delay_reject=yes, the client and HELO checks
run at RCPT (they are in RECIPIENT_RESTRICTIONS), so the CONNECT and HELO
tables are empty here: a restriction put there runs at that stage. The
server (relay.smtpd.server, relay.smtpd.transaction) calls one check_* per
stage, as smtpd.c calls smtpd_check_client/helo/mail/rcpt/data/eod; the
protocol's own errors (syntax, sequence, limits on the session) stay there.

Postfix semantics (smtpd_check.c): the first restriction that permits or
rejects ends the chain; a reply marked defer_if_permit (a temporary DNS
failure) is remembered and only returned if nothing later rejects. After a
permit at RCPT, the implicit reject_unlisted_recipient still runs (Postfix's
smtpd_reject_unlisted_recipient=yes).

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
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from mailrelay_api.spec import HOPCOUNT_LIMIT
from relay import metrics
from relay.config import RelayConfig
from relay.queue.incoming import IncomingMessage
from relay.smtpd.addresses import Address, is_fqdn, is_ip_literal, is_routed
from relay.smtpd.authres import Authenticator, Outcome
from relay.smtpd.content import ContentCheck
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.greylist import Greylist
from relay.smtpd.greylist import Outcome as Greylisted
from relay.smtpd.session import (
    AccessAction,
    Reply,
    Session,
    Transaction,
    access_action,
    client_name,
)
from relay.smtpd.smtpdata import HopCount
from relay.smtpd.spf import SpfChecker
from relay.verify_cache import ProbeResult, RecipientVerifier, Status

log = logging.getLogger("mailrelay.smtpd")


class Stage(enum.StrEnum):
    """The SMTP stages that have a restriction table."""

    CONNECT = "CONNECT"
    HELO = "HELO"
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    END_OF_DATA = "END-OF-DATA"


# What a rejection names, per stage (Postfix's reply_class): "<name>: <class> rejected: ...".
_REJECTED_CLASS = {
    Stage.CONNECT: "Client host",
    Stage.HELO: "Helo command",
    Stage.MAIL: "Sender address",
    Stage.RCPT: "Recipient address",
    Stage.DATA: "Data command",
    Stage.END_OF_DATA: "End-of-data",
}


class Permit(enum.Enum):
    PERMIT = "permit"


PERMIT = Permit.PERMIT
Verdict = Reply | Permit | None  # None: no opinion (Postfix DUNNO), go on


def _storage_unknown() -> bool:
    return True


@dataclass
class Check:
    """What one restriction looks at. The server keeps one per session and
    fills in what the stage adds (the transaction at MAIL, the recipient at
    RCPT, the content check at DATA)."""

    config: RelayConfig
    session: Session
    transaction: Transaction | None
    rcpt: Address | None
    dns: DnsChecks
    spf: SpfChecker
    # The restrictions that decided in the last stage run, for logs and metrics.
    reasons: list[str] = field(default_factory=list)
    stage: Stage = Stage.RCPT
    # Enough free space on the queue's file system for a message of the maximum size.
    storage_ok: Callable[[], bool] = _storage_unknown
    content: ContentCheck | None = None  # the attachment filter, fed during DATA
    hops: HopCount | None = None  # the Received: headers, counted during DATA
    verifier: RecipientVerifier | None = None  # the probe cache of recipients: verify
    authenticator: Authenticator | None = None  # contentFilters.authentication
    message: IncomingMessage | None = None  # at END-OF-DATA: the received message
    authenticated: Outcome | None = None  # its results, header edits, DMARC verdict
    greylist: Greylist | None = None  # the triplets of restrictions.greylist

    @property
    def recipient(self) -> Address:
        """The RCPT stage's address (a recipient restriction outside RCPT is a bug)."""
        assert self.rcpt is not None, f"a recipient restriction ran at {self.stage}"
        return self.rcpt

    @property
    def txn(self) -> Transaction:
        assert self.transaction is not None, f"a transaction restriction ran at {self.stage}"
        return self.transaction

    def rejected(self, code: int, status: str, text: str) -> Reply:
        """Postfix's "<name>: <class> rejected: <text>" for this stage."""
        name, what = self._reply_name(), _REJECTED_CLASS[self.stage]
        return Reply(code, status, f"<{name}>: {what} rejected: {text}")

    def _reply_name(self) -> str:
        stage = self.stage
        if stage is Stage.RCPT:
            return self.recipient.original
        if stage is Stage.MAIL:
            return self.txn.sender
        if stage is Stage.HELO:
            return self.session.helo or ""
        if stage is Stage.CONNECT:
            return self.session.client_ip
        return "DATA" if stage is Stage.DATA else "END-OF-MESSAGE"


Restriction = Callable[[Check], Awaitable[Verdict]]


# --- the restrictions ----------------------------------------------------------


async def screen_enforce(c: Check) -> Verdict:
    """postscreen's enforce action: every RCPT gets the screen's reply."""
    screen = c.session.screen
    if screen.action == "enforce":
        return screen.reply or Reply(550, "5.5.1", "Protocol error")
    return None


async def relay_access(c: Check) -> Verdict:
    """reject_unauth_destination: only relay domains, and no sender-specified
    routing (% ! @, quoted local parts, source routes, IP literals)."""
    rcpt = c.recipient
    if is_routed(rcpt) or is_ip_literal(rcpt.domain) or c.config.domain_of(rcpt.domain_key) is None:
        return Reply(554, "5.7.1", f"<{rcpt.original}>: Relay access denied")
    return None


async def unauth_pipelining(c: Check) -> Verdict:
    """reject_unauth_pipelining, at whichever stage it is listed."""
    if c.config.restrictions.reject_unauth_pipelining and c.session.unauth_pipelining:
        return c.rejected(503, "5.5.0", "Improper use of SMTP command pipelining")
    return None


async def non_fqdn_recipient(c: Check) -> Verdict:
    domain = c.recipient.domain
    if (
        c.config.restrictions.reject_non_fqdn_recipient
        and not is_ip_literal(domain)
        and not is_fqdn(domain)
    ):
        return c.rejected(504, "5.5.2", "need fully-qualified address")
    return None


async def unknown_recipient_domain(c: Check) -> Verdict:
    if not c.config.restrictions.reject_unknown_recipient_domain:
        return None
    return await c.dns.unknown_recipient_domain(c.recipient.text, c.recipient.domain_key)


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
    rcpt = c.recipient
    domain = c.config.domain_of(rcpt.domain_key)
    if domain is None or domain.recipients != "listed":
        return None
    table = c.config.recipients
    if rcpt.lookup_key in table or f"@{domain.name}" in table:
        return None
    return c.rejected(550, "5.1.1", "User unknown in relay recipient table")


async def unverified_recipient(c: Check) -> Verdict:
    """reject_unverified_recipient: `verify` domains accept what their next
    hop accepts, asked with a probe (relay.verify_cache). A definite 5xx from
    it is a 550 here, where Postfix's unverified_recipient_reject_code is 450:
    a backup MX that asked the primary knows the user does not exist."""
    rcpt = c.recipient
    domain = c.config.domain_of(rcpt.domain_key)
    if domain is None or domain.recipients != "verify":
        return None
    if c.verifier is None:
        result = ProbeResult(Status.UNREACHABLE, "address verification is not available")
    else:
        result = await c.verifier.verify(rcpt.text, domain)
    if result.status is Status.OK:
        return None
    if result.status is Status.REJECTED:
        return c.rejected(550, "5.1.1", f"undeliverable address: {result.reply}")
    if domain.verify.when_unreachable == "accept":
        return None
    return c.rejected(450, "4.1.1", f"unverified address: {result.reply}")


async def spf(c: Check) -> Verdict:
    """spf-engine, once per transaction; its header is prepended once."""
    if not c.config.restrictions.spf.enabled:
        return None
    t = c.txn
    if t.spf is None:
        t.spf = await c.spf.check(c.session, t.sender, c.recipient.text)
        if t.spf.header:
            t.prepend_headers.append(t.spf.header)
    return t.spf.reply


async def greylist(c: Check) -> Verdict:
    """postgrey: the first attempt of a (client network, sender, recipient)
    triplet is deferred, its retry after the delay passes (relay.smtpd.greylist).
    A plain 450, not Postfix's DEFER_IF_PERMIT: only the recipient probe comes
    after it, and a sender that never retries should never cost a probe."""
    policy = c.config.restrictions.greylist
    if not policy.enabled or c.greylist is None:
        return None
    if policy.skip_allowlisted and c.session.screen.allowlisted:
        metrics.child(metrics.GREYLIST, "allowlisted").inc()
        return None
    sender, rcpt = c.txn.sender, c.recipient.text
    decision = await c.greylist.check(c.session.client_ip, sender, rcpt, policy)
    metrics.child(metrics.GREYLIST, str(decision.outcome)).inc()
    if decision.outcome is Greylisted.PASSED:
        log.info(
            "greylist: pass after %.0fs: %s from=<%s> to=<%s>",
            decision.waited,
            client_name(c.session),
            sender,
            rcpt,
        )
    if decision.passes:
        return None
    return c.rejected(450, "4.2.0", f"Greylisted, try again in {math.ceil(decision.wait)} seconds")


async def message_size(c: Check) -> Verdict:
    """MAIL FROM SIZE= over message_size_limit (Postfix smtpd_check_size)."""
    size = c.txn.size_hint
    if size is not None and size > c.config.limits.message_size:
        return Reply(552, "5.3.4", "Message size exceeds fixed limit")
    return None


async def storage(c: Check) -> Verdict:
    """Less free queue space than 1.5 x message_size_limit (Postfix smtpd_check_queue)."""
    if c.storage_ok():
        return None
    log.warning("not enough free space in the queue for MAIL from %s", client_name(c.session))
    return Reply(452, "4.3.1", "Insufficient system storage")


async def hopcount(c: Check) -> Verdict:
    """Postfix's hopcount_limit (cleanup): as many Received: headers as the limit,
    ours included, is a mail loop (between relays that do not know each other)."""
    if c.hops is not None and c.hops.hops >= HOPCOUNT_LIMIT:
        return Reply(554, "5.4.0", "Error: too many hops")
    return None


async def content(c: Check) -> Verdict:
    """The attachment filter's verdict on the message it read during DATA."""
    return c.content.verdict() if c.content is not None else None


async def authentication(c: Check) -> Verdict:
    """contentFilters.authentication (OpenDKIM/OpenDMARC verify, relay.smtpd.authres):
    DKIM, ARC and DMARC results for the Authentication-Results header the message
    gets; a DMARC fail is refused (or held) only as dmarc.enforce says."""
    policy = c.config.authentication
    if not policy.enabled or c.authenticator is None or c.message is None:
        return None
    # A message still in memory is read from there: no file written for the check,
    # and the milters' in-memory edit stays possible.
    held = c.message.in_memory()
    source = held if held is not None else str(await c.message.flush())
    outcome = c.txn.spf
    spf = (outcome.result, outcome.domain) if outcome is not None and outcome.result else None
    c.authenticated = done = await c.authenticator.check(
        policy, c.config.hostname, source, spf, trusted=c.session.trusted
    )
    log.info(
        "%s: authentication: %s",
        c.message.queue_id,
        "; ".join(m.text() for m in done.methods) or "none",
    )
    return done.reply


# --- the tables, one per stage, in the order they run ------------------------------

CLIENT_RESTRICTIONS: tuple[Restriction, ...] = ()
HELO_RESTRICTIONS: tuple[Restriction, ...] = ()
SENDER_RESTRICTIONS: tuple[Restriction, ...] = (message_size, storage)
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
    greylist,  # opt-in; after every check that refuses for good
    unverified_recipient,  # last: a probe costs the primary more than any check above
)
DATA_RESTRICTIONS: tuple[Restriction, ...] = (unauth_pipelining,)
END_OF_DATA_RESTRICTIONS: tuple[Restriction, ...] = (hopcount, content, authentication)

# Runs even when an earlier recipient restriction permitted (Postfix's
# implicit smtpd_reject_unlisted_recipient; for `verify` domains the same holds).
IMPLICIT_AFTER_PERMIT: tuple[Restriction, ...] = (unlisted_recipient, unverified_recipient)


# --- running a stage -------------------------------------------------------------
# Each check_* reads its table when it runs: a table replaced at run time counts.
# They return _run's coroutine rather than await it: one coroutine per stage run.


def check_client(c: Check) -> Awaitable[Reply | None]:
    """CONNECT: None to greet the client, or the reply to send instead."""
    return _run(Stage.CONNECT, CLIENT_RESTRICTIONS, c)


def check_helo(c: Check) -> Awaitable[Reply | None]:
    return _run(Stage.HELO, HELO_RESTRICTIONS, c)


def check_sender(c: Check) -> Awaitable[Reply | None]:
    return _run(Stage.MAIL, SENDER_RESTRICTIONS, c)


def check_recipient(c: Check) -> Awaitable[Reply | None]:
    """Runs the chain for one RCPT: None to accept, or the reply to send."""
    return _run(Stage.RCPT, RECIPIENT_RESTRICTIONS, c, IMPLICIT_AFTER_PERMIT)


def check_data(c: Check) -> Awaitable[Reply | None]:
    return _run(Stage.DATA, DATA_RESTRICTIONS, c)


def check_end_of_data(c: Check) -> Awaitable[Reply | None]:
    return _run(Stage.END_OF_DATA, END_OF_DATA_RESTRICTIONS, c)


async def _run(
    stage: Stage,
    table: tuple[Restriction, ...],
    c: Check,
    after_permit: tuple[Restriction, ...] = (),
) -> Reply | None:
    """One stage's chain, Postfix's way: the first permit or reject ends it; a
    defer_if_permit reply waits for a later reject, and is the answer if none
    comes. None to go on, or the reply to send, counted under the restriction
    that decided. A restriction that fails is a 451, never an accept."""
    c.stage = stage
    c.reasons.clear()
    result: Reply | None = None
    try:
        deferred: Reply | None = None
        permitted = False
        ran = 0
        for restriction in table:
            ran += 1
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
            result = verdict
            break
        if permitted:
            for restriction in after_permit:
                if restriction in table[:ran]:
                    continue
                verdict = await restriction(c)
                if isinstance(verdict, Reply) and not verdict.defer_if_permit:
                    c.reasons.append(restriction.__name__)
                    result = verdict
                    break
        if result is None:
            result = deferred
    except Exception:
        log.exception("restriction failed for %s", client_name(c.session))
        c.reasons.append("policy_error")
        result = Reply(451, "4.3.5", "Server configuration problem")
    if result is not None:
        metrics.child(metrics.REJECTED, c.reasons[-1] if c.reasons else "policy").inc()
    return result


def client_access_action(config: RelayConfig, client_ip: str) -> AccessAction | None:
    """The first clientAccess CIDR that matches decides; None when none does."""
    if not config.client_access:
        return None
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    for entry in config.client_access:
        if ip.version == entry.network.version and ip in entry.network:
            return access_action(entry.action)
    return None


def in_mynetworks(config: RelayConfig, client_ip: str) -> bool:
    try:
        ip = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in config.mynetworks)
