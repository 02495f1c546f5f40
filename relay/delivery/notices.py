"""Which delivery status notifications go back to a sender, and queueing them.

After an attempt, qmgr hands over what failed (bounced or expired
recipients) and what was delivered; this module decides, as Postfix's
bounce daemon does with RFC 3461's parameters (relay.queue.mailparams):
  - a failure is returned unless the recipient's NOTIFY leaves out FAILURE
    (NOTIFY=NEVER, or only SUCCESS/DELAY): then it is only logged;
  - a delivery is reported ("relayed") when the recipient asked for
    NOTIFY=SUCCESS and the next hop does not offer DSN (a next hop that
    does got NOTIFY passed on: its notices, not ours);
  - a failure returns the whole message when it is at most
    dsn.BOUNCE_SIZE_LIMIT, else its headers; RET=HDRS returns the headers,
    RET=FULL and no RET the message (RFC 3461 leaves the default to the
    server; Postfix's is the message); ENVID and ORCPT go into the
    report's fields;
  - a message that asked for SMTPUTF8, or whose reported addresses or
    returned headers are UTF-8, gets RFC 6533's global notice, queued
    with SMTPUTF8 (dsn.is_international);
  - never to the null sender, nor to a sender we cannot send to, nor when
    spec.bounces says not to (the reason is logged and counted).
The DSN itself is built by relay.delivery.dsn and queued here from the
null sender; qmgr delivers it like any message.
"""

from __future__ import annotations

import logging

from relay import metrics
from relay.config import RelayConfig
from relay.delivery import dsn
from relay.delivery.dsn import BOUNCE_SIZE_LIMIT, Failure, build_dsn, is_international
from relay.delivery.transaction import SENT, AddressError, RecipientResult, check_address
from relay.queue.format import Claim
from relay.queue.mailparams import NO_PARAMS, MailParams
from relay.queue.store import Queue

log = logging.getLogger("relay.delivery")


def failure(r: RecipientResult, claim: Claim, *, expired: bool = False) -> Failure:
    """The report of one recipient (failed, or relayed when it was SENT)."""
    host = r.relay.rsplit(":", 1)[0] if r.relay != "none" else ""
    return Failure(
        recipient=r.recipient,
        status=r.status,
        diagnostic=r.reply,
        remote_mta=host,
        smtp_reply=r.smtp_reply,
        in_reply_to=r.in_reply_to,
        expired=expired,
        rcpt_params=claim.envelope.params.recipient(r.recipient),
        action="relayed" if r.kind == SENT else "failed",
    )


def relayed(claim: Claim, results: list[RecipientResult]) -> list[Failure]:
    """The deliveries to report: NOTIFY=SUCCESS, sent to a next hop without DSN."""
    params = claim.envelope.params
    if not params.recipients or claim.envelope.client == dsn.CLIENT:
        return []
    return [
        failure(r, claim)
        for r in results
        if r.kind == SENT and not r.dsn_passed and params.recipient(r.recipient).wants("SUCCESS")
    ]


def wanted(claim: Claim, failures: list[Failure]) -> list[Failure]:
    """The failures whose recipient wants a notice (NOTIFY); the others are logged."""
    params = claim.envelope.params
    kept = []
    for f in failures:
        rcpt = params.recipient(f.recipient)
        if rcpt.wants("FAILURE"):
            kept.append(f)
            continue
        metrics.child(metrics.DSN, "dropped", "notify").inc()
        if f.expired:
            continue  # its expiry line said "not returned (NOTIFY=...)"
        log.info(
            "%s: to=<%s>: non-delivery notification not sent (NOTIFY=%s)",
            claim.queue_id,
            f.recipient,
            ",".join(rcpt.notify),
        )
    return kept


def not_returned(
    claim: Claim, config: RelayConfig, failures: list[Failure]
) -> tuple[str, str] | None:
    """Why no DSN goes back for `failures`: (metric reason, log text), or None."""
    env = claim.envelope
    if not env.sender:
        if env.client == dsn.CLIENT:  # our own DSN failed: never a bounce of a bounce
            why = "expired" if any(f.expired for f in failures) else "rejected"
            return why, f"{why}: {dsn.one_line(failures[0].diagnostic)}"
        return "null_sender", "the sender is null (a bounce is never bounced)"
    if config.bounces.delivery == "none":
        return "disabled", "bounces.delivery is none"
    try:
        check_address(env.sender)
    except AddressError as e:  # Postfix's double bounce, with no postmaster to get it
        return "bad_sender", str(e)
    domain = env.sender.rpartition("@")[2]
    if not domain:
        return "bad_sender", "the sender has no domain"
    if config.bounces.delivery == "relayDomainsOnly" and config.domain_of(domain) is None:
        return "not_relay_domain", (
            f"{domain} is not a relay domain here (bounces.delivery: relayDomainsOnly)"
        )
    return None


async def return_to_sender(
    queue: Queue, claim: Claim, config: RelayConfig, reports: list[Failure], now: float
) -> str | None:
    """Queues the DSN for `reports` (all failed, or all relayed); returns its
    queue id (for the caller to deliver), or None when none is sent."""
    env = claim.envelope
    not_sent = not_returned(claim, config, reports)
    if not_sent is not None:
        reason, text = not_sent
        to = env.recipients[0] if env.client == dsn.CLIENT and not env.sender else env.sender
        # (our own DSN that failed: a bounce or a "relayed" notice, either way a DSN)
        own = env.client == dsn.CLIENT and not env.sender
        kind = "non-delivery" if reports[0].action == "failed" and not own else "delivery status"
        log.warning("%s: %s notification to <%s> dropped: %s", claim.queue_id, kind, to, text)
        metrics.child(metrics.DSN, "dropped", reason).inc()
        return None
    headers = await queue.run_io(queue.read_headers_sync, claim)
    original = None
    # Without RET, as with RET=FULL: the message (Postfix 3.7 does the same).
    if env.params.ret != "HDRS" and reports[0].action == "failed" and env.size <= BOUNCE_SIZE_LIMIT:
        original = await queue.run_io(queue.read_data_sync, claim, 0, BOUNCE_SIZE_LIMIT)
    international = is_international(
        smtputf8=env.params.smtputf8,
        sender=env.sender,
        failures=reports,
        original_headers=headers,
    )
    msg = queue.incoming()
    data = build_dsn(
        hostname=config.hostname,
        queue_id=claim.queue_id,
        original_sender=env.sender,
        arrival=env.arrival,
        failures=reports,
        original_headers=headers,
        now=now,
        dsn_queue_id=msg.queue_id,
        lifetime_days=config.queue.lifetime / 86400,
        envid=env.params.envid,
        original_message=original,
        international=international,
    )
    msg.write(data)
    # An internationalised notice asks for SMTPUTF8 as Postfix's does: sent
    # with it where the next hop offers it, required only for a UTF-8 sender.
    params = MailParams(smtputf8=True) if international else NO_PARAMS
    dsn_id = await msg.commit("", [env.sender], dsn.CLIENT, params=params)
    kind = "delivery status" if reports[0].action == "relayed" else "non-delivery"
    log.info("%s: sender %s notification: %s", claim.queue_id, kind, dsn_id)
    return dsn_id
