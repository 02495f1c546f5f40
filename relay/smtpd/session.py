"""What the stages of an SMTP session share: replies, the session's state, the
transaction, verdicts.

The stages, in order, as Postfix splits them into programs:
  screen (postscreen)  ->  smtpd (the protocol) + policy (the restrictions of
  every SMTP stage, content checks at end of DATA)  ->  queue (durable spool)
  ->  delivery (qmgr + smtp client)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from relay.queue.mailparams import NO_PARAMS, MailParams, RecipientParams

# postscreen's verdict: pass (go on), enforce (550 to every RCPT, no DATA),
# drop (send the reply, if any, and close).
ScreenAction = Literal["pass", "enforce", "drop"]
# Which test decided; "" for none.
ScreenReason = Literal["", "access", "pregreet", "dnsbl", "hangup"]
# What the access list (mynetworks, clientAccess CIDRs) says of a client.
AccessAction = Literal["permit", "reject"]


def access_action(action: str) -> AccessAction:
    """A clientAccess entry's action (the schema allows these two only)."""
    return "permit" if action == "permit" else "reject"


@dataclass(frozen=True)
class Reply:
    """One SMTP reply. `str()` gives the line without CRLF."""

    code: int
    status: str  # enhanced status code, e.g. "5.7.1"; "" for none
    text: str
    # Postfix reject_tempfail_action=defer_if_permit: keep looking for a
    # reject, and defer with this reply only if the mail would be accepted.
    defer_if_permit: bool = False
    disconnect: bool = False  # close the connection after sending it

    def __str__(self) -> str:
        return " ".join(p for p in (str(self.code), self.status, self.text) if p)

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


@dataclass
class ScreenResult:
    """The postscreen verdict on a connection."""

    action: ScreenAction = "pass"
    reason: ScreenReason = ""
    reply: Reply | None = None  # under enforce: the answer to every RCPT
    dnsbl_score: int = 0
    # permit in clientAccess / mynetworks, or at or below the DNSBL allowlist
    # threshold: skip the other tests.
    allowlisted: bool = False
    cached: bool = False  # PASS OLD: a result from the cache, no wait


@dataclass
class Session:
    """One client connection's state, shared by the stages."""

    client_ip: str  # the real client (after PROXY, when trusted)
    client_port: int = 0
    peer_ip: str = ""  # the socket peer (a load balancer under PROXY)
    local_ip: str = ""
    local_port: int = 0
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    trusted: bool = False  # client in mynetworks
    screen: ScreenResult = field(default_factory=ScreenResult)
    # Set when the client sent commands ahead of a reply where that is not
    # allowed (Postfix reject_unauth_pipelining).
    unauth_pipelining: bool = False
    reverse_name: str | None = None  # PTR result, once looked up
    errors: int = 0
    junk_commands: int = 0  # NOOP, VRFY, ETRN, RSET (smtpd_junk_command_limit)
    messages: int = 0


@dataclass(frozen=True)
class SpfOutcome:
    """What the SPF check says about a transaction: a reply to refuse with,
    and the header to prepend."""

    reply: Reply | None = None
    header: str | None = None  # "Received-SPF: ..." without CRLF
    # For DMARC (relay.smtpd.authres): pyspf's result for MAIL FROM (for the null
    # sender: HELO) and that identity's domain; "" when SPF did not evaluate it.
    result: str = ""
    domain: str = ""


@dataclass
class Transaction:
    """One message transaction (MAIL FROM .. end of DATA): the envelope, and
    what the restrictions keep between its recipients."""

    sender: str  # "" for the null sender
    recipients: list[str] = field(default_factory=list)
    mail_options: list[str] = field(default_factory=list)
    size_hint: int | None = None  # MAIL FROM SIZE=
    # SMTPUTF8, BODY, RET, ENVID from MAIL (recipients empty); NOTIFY and
    # ORCPT of each accepted recipient that gave any.
    params: MailParams = NO_PARAMS
    rcpt_params: dict[str, RecipientParams] = field(default_factory=dict)
    rcpt_count: int = 0  # RCPTs accepted, repeats included (smtpd_recipient_limit)
    # Headers to prepend (Received-SPF, Received), in order.
    prepend_headers: list[str] = field(default_factory=list)
    spf: SpfOutcome | None = None  # SPF runs once per transaction


def client_name(session: Session) -> str:
    """Postfix's `name[ip]` for logs and Received headers."""
    return f"{session.reverse_name or 'unknown'}[{session.client_ip}]"
