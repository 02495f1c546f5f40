"""Delivery status notifications (RFC 3464): how returned mail looks.

A bounce is a multipart/report with three parts, as Postfix writes it: a
text for people, a message/delivery-status with one block per failed
recipient, and the returned message: whole (message/rfc822) when it is at
most BOUNCE_SIZE_LIMIT and the sender did not ask for RET=HDRS, else its
headers (text/rfc822-headers), so a bounce never carries a 25 MB body
back. It is sent from the null sender so it can never bounce itself.

An internationalised notice (RFC 6533: is_international) takes the global
types instead: message/global-delivery-status, with a UTF-8 address as
"utf-8; <unitext>", and message/global or message/global-headers for the
returned message; it is queued with SMTPUTF8 (relay.delivery.notices).
An all-ASCII message that did not ask for SMTPUTF8 gets the notice above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate

from relay.queue.mailparams import NO_RECIPIENT_PARAMS, RecipientParams, unitext_encode

MAILER_DAEMON = "MAILER-DAEMON"
# The envelope's client of a DSN this relay queued: it marks the message
# as ours (routed to the sender's domain by MX, dropped when undeliverable)
# and travels with it in a handover.
CLIENT = "bounce"
SUBJECT = "Undelivered Mail Returned to Sender"
# A "relayed" notice (NOTIFY=SUCCESS, the next hop does not offer DSN).
SUCCESS_SUBJECT = "Successful Mail Delivery Report"
# A bounce returns the whole message up to this size (unless RET=HDRS),
# else its headers (Postfix's bounce_size_limit: a larger message comes
# back as text/rfc822-headers there too).
BOUNCE_SIZE_LIMIT = 50_000
_LINE_ENDS = re.compile(rb"\r\n|\r|\n")
_STATUS = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Failure:
    """One recipient the message is returned for."""

    recipient: str
    status: str  # enhanced status code, e.g. "5.1.1" (4.x.x for expired mail)
    diagnostic: str  # the next hop's reply ("550 5.1.1 ...") or our own reason
    remote_mta: str = ""  # the next hop's name, when it answered
    smtp_reply: bool = True  # diagnostic is an SMTP reply (else our own text)
    in_reply_to: str = ""  # "RCPT TO", "end of DATA", ... (for the text part)
    expired: bool = False
    rcpt_params: RecipientParams = NO_RECIPIENT_PARAMS  # its NOTIFY and ORCPT
    action: str = "failed"  # or "relayed": delivered to a next hop without DSN


def one_line(text: str) -> str:
    """One header line: no CR/LF may come from a remote reply into our headers."""
    return " ".join(text.split())


def _success_text(hostname: str, relayed: list[Failure]) -> str:
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
        "",
        "                   The mail system",
        "",
    ]
    for f in relayed:
        lines.append(f"<{f.recipient}>: delivery via {f.remote_mta}: {one_line(f.diagnostic)}")
    return "\r\n".join(lines) + "\r\n"


def _human_text(hostname: str, failures: list[Failure], lifetime_days: float | None) -> str:
    if failures and all(f.action == "relayed" for f in failures):
        return _success_text(hostname, failures)
    lines = [f"This is the mail system at host {hostname}.", ""]
    if any(f.expired for f in failures) and lifetime_days is not None:
        lines += [
            "Your message could not be delivered for more than "
            f"{lifetime_days:g} day(s); it will not be retried any more.",
            "",
        ]
    lines += [
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for f in failures:
        if f.remote_mta and f.smtp_reply:
            said = f"host {f.remote_mta} said: {one_line(f.diagnostic)}"
            if f.in_reply_to:
                said += f" (in reply to {f.in_reply_to} command)"
        else:
            said = one_line(f.diagnostic)
        lines.append(f"<{f.recipient}>: {said}")
    return "\r\n".join(lines) + "\r\n"


def is_international(
    *, smtputf8: bool, sender: str, failures: list[Failure], original_headers: bytes
) -> bool:
    """Does the notice take RFC 6533's global types? As Postfix 3.7, when the
    message asked for SMTPUTF8; beyond Postfix, also when the sender, a
    failed recipient or a returned header is UTF-8 (accepted without
    SMTPUTF8, as Postfix does), which message/delivery-status and
    message/rfc822 do not carry. (A utf-8 ORCPT alone does not: its xtext
    form is ASCII.)"""
    return (
        smtputf8
        or not sender.isascii()
        or not original_headers.isascii()
        or any(not f.recipient.isascii() for f in failures)
    )


def _address(address: str, international: bool, sep: str = " ") -> str:
    """An address field's value: "utf-8" type for a UTF-8 address in a
    global notice (RFC 6533 3, as Postfix), else "rfc822"."""
    if international and not address.isascii():
        return f"utf-8;{sep}{unitext_encode(address)}"
    return f"rfc822;{sep}{address}"


def _status_block(f: Failure, international: bool) -> str:
    status = f.status if _STATUS.match(f.status) else ("4.0.0" if f.expired else "5.0.0")
    original = f.rcpt_params.original_recipient(unitext=international)
    block = [
        f"Final-Recipient: {_address(f.recipient, international)}",
        f"Original-Recipient: {one_line(original or _address(f.recipient, international, ''))}",
        f"Action: {f.action}",
        f"Status: {status}",
    ]
    if f.remote_mta:
        block.append(f"Remote-MTA: dns; {f.remote_mta.split('[')[0]}")
    kind = "smtp" if f.smtp_reply else "X-mailrelay"
    block.append(f"Diagnostic-Code: {kind}; {one_line(f.diagnostic)}")
    return "\r\n".join(block) + "\r\n"


def header_section(original_headers: bytes) -> bytes:
    """The returned headers with CRLF line ends, ending in one blank line."""
    text = _LINE_ENDS.sub(b"\r\n", original_headers).rstrip(b"\r\n")
    return text + b"\r\n" if text else b""


def build_dsn(
    *,
    hostname: str,
    queue_id: str,
    original_sender: str,
    arrival: float,
    failures: list[Failure],
    original_headers: bytes,
    now: float,
    dsn_queue_id: str = "",
    lifetime_days: float | None = None,
    envid: str = "",
    original_message: bytes | None = None,
    international: bool = False,
) -> bytes:
    """The whole bounce message (headers and body, CRLF line ends).

    `failures` all "failed", or all "relayed" (a success notice); `envid`:
    the client's ENVID; `original_message`: the whole message to return
    (not RET=HDRS, small enough), else its headers are returned;
    `international`: RFC 6533's global types (is_international)."""
    success = bool(failures) and all(f.action == "relayed" for f in failures)
    boundary = f"{queue_id}.{int(now)}/{hostname}"
    message_id = f"<{int(now)}.{dsn_queue_id or queue_id}@{hostname}>"
    headers = [
        f"From: {MAILER_DAEMON}@{hostname} (Mail Delivery System)",
        f"To: {original_sender}",
        f"Subject: {SUCCESS_SUBJECT if success else SUBJECT}",
        f"Date: {formatdate(now)}",
        f"Message-Id: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: 8bit",
    ]
    per_message = [f"Original-Envelope-Id: {one_line(envid)}"] if envid else []
    per_message += [
        f"Reporting-MTA: dns; {hostname}",
        f"X-Mailrelay-Queue-ID: {queue_id}",
        f"X-Mailrelay-Sender: {_address(original_sender, international)}",
        f"Arrival-Date: {formatdate(arrival)}",
    ]
    parts = [
        "\r\n".join(headers) + "\r\n\r\n",
        "This is a MIME-encapsulated message.\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Description: Notification\r\n",
        "Content-Type: text/plain; charset=utf-8\r\n",
        "Content-Transfer-Encoding: 8bit\r\n\r\n",
        _human_text(hostname, failures, lifetime_days),
        f"\r\n--{boundary}\r\n",
        "Content-Description: Delivery report\r\n",
        # (8bit, as Postfix: so the global type is never downgraded)
        "Content-Type: message/global-delivery-status\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        if international
        else "Content-Type: message/delivery-status\r\n\r\n",
        "\r\n".join(per_message) + "\r\n",
        *("\r\n" + _status_block(f, international) for f in failures),
        f"\r\n--{boundary}\r\n",
    ]
    what = "Delivered Message" if success else "Undelivered Message"
    if original_message is not None:
        kind = "message/global" if international else "message/rfc822"
        parts.append(f"Content-Description: {what}\r\nContent-Type: {kind}\r\n")
        returned = _LINE_ENDS.sub(b"\r\n", original_message).rstrip(b"\r\n") + b"\r\n"
    else:
        kind = "message/global-headers" if international else "text/rfc822-headers"
        parts.append(f"Content-Description: {what} Headers\r\nContent-Type: {kind}\r\n")
        returned = header_section(original_headers)
    parts.append("Content-Transfer-Encoding: 8bit\r\n\r\n")
    body = "".join(parts).encode("utf-8", "surrogateescape")
    return body + returned + f"\r\n--{boundary}--\r\n".encode()
