"""The session side of the milters: what the SMTP protocol code calls.

`SessionMilters` wraps one session's MilterChain with what Postfix sends and
does around it:
- the macros, per stage, as Postfix's defaults send them (milter_*_macros):
  j {daemon_name} {daemon_addr} v _ {client_addr} {client_name} {client_port}
  {client_ptr} at CONNECT; {tls_version} {cipher} {cipher_bits} {cert_subject}
  {cert_issuer} at HELO; i {auth_type} {auth_authen} {auth_author}
  {mail_addr} {mail_host} {mail_mailer} at MAIL; i {rcpt_addr} {rcpt_host}
  {rcpt_mailer} at RCPT; i from DATA on. There is no AUTH on port 25: the
  {auth_*} macros are empty. {i} is the queue id, known here from DATA on
  (Postfix knows it from the first accepted RCPT): empty at MAIL and RCPT;
- a refusal while the message streams is kept for the end of DATA, as
  Postfix's cleanup does; a milter that was sent MAIL gets ABORT before the
  next MAIL or HELO when its message did not reach the end of data;
- at end of data, `end_of_message` applies the verdict to the received
  message: refuse it, discard it (250, then dropped), or copy it with the
  milters' edits into a new queue file (in memory while the message is; else
  headers edited in memory, the body copied in chunks) to be held when a
  milter asked for quarantine.
Nothing here raises for what a milter does (relay.smtpd.milters turns that
into the milter's defaultAction); queue errors are the caller's, as for any
write.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import IO, Any

from relay.config import RelayConfig
from relay.queue.incoming import IncomingMessage
from relay.queue.store import Queue
from relay.smtpd.milter import Modifications
from relay.smtpd.milteredit import (
    COPY_CHUNK,
    edit_envelope,
    edited_head,
    modified,
    read_header_section,
    replacement_body,
)
from relay.smtpd.milters import MessageVerdict, MilterChain
from relay.smtpd.session import Reply, Session

log = logging.getLogger("mailrelay.milter")

DAEMON_NAME = "mailrelay"  # Postfix: {daemon_name} is the service name (smtpd)
MAILER = "smtp"  # {mail_mailer}, {rcpt_mailer}: Postfix's transport names


def _host_of(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


def tls_macros(ssl_object: Any) -> dict[str, str]:
    """{tls_version} {cipher} {cipher_bits} of a TLS session (none without TLS)."""
    if ssl_object is None:
        return {}
    name, version, bits = ssl_object.cipher() or ("", "", 0)
    return {"{tls_version}": str(version), "{cipher}": str(name), "{cipher_bits}": str(bits)}


class SessionMilters:
    """The milters of one SMTP session (None of them when none are configured)."""

    def __init__(self, config: RelayConfig, session: Session) -> None:
        self.session = session
        name = session.reverse_name or "unknown"
        self.chain = MilterChain(
            config.milters,
            {
                "j": config.hostname,
                "{daemon_name}": DAEMON_NAME,
                "{daemon_addr}": session.local_ip,
                "v": DAEMON_NAME,
                "_": f"{name} [{session.client_ip}]",
                "{client_addr}": session.client_ip,
                "{client_name}": name,
                "{client_port}": str(session.client_port),
                "{client_ptr}": name,
            },
        )
        self.content_refusal: Reply | None = None  # a refusal while DATA streamed
        self.in_message = False

    @classmethod
    def for_session(cls, config: RelayConfig, session: Session) -> SessionMilters | None:
        return cls(config, session) if config.milters else None

    async def connect(self) -> Reply | None:
        s = self.session
        return await self.chain.connect(s.reverse_name or "unknown", s.client_ip, s.client_port)

    async def helo(self, name: str, tls: dict[str, str]) -> Reply | None:
        await self.abort()  # HELO and EHLO end a transaction
        macros = {
            k: tls.get(k, "")
            for k in (
                "{tls_version}",
                "{cipher}",
                "{cipher_bits}",
                "{cert_subject}",
                "{cert_issuer}",
            )
        }
        return await self.chain.helo(name, macros)

    async def mail(self, sender: str, args: list[str]) -> Reply | None:
        await self.abort()
        self.content_refusal = None
        self.in_message = True  # ABORT before the next MAIL, whatever the answer
        macros = {
            "i": "",
            "{auth_type}": "",
            "{auth_authen}": "",
            "{auth_author}": "",
            "{mail_addr}": sender,
            "{mail_host}": _host_of(sender),
            "{mail_mailer}": MAILER,
        }
        return await self.chain.mail(sender, args, macros)

    async def rcpt(self, recipient: str, args: list[str]) -> Reply | None:
        macros = {
            "i": "",
            "{rcpt_addr}": recipient,
            "{rcpt_host}": _host_of(recipient),
            "{rcpt_mailer}": MAILER,
        }
        return await self.chain.rcpt(recipient, args, macros)

    async def data(self, queue_id: str) -> Reply | None:
        self.chain.queue_id = queue_id
        return await self.chain.data()

    async def feed(self, chunk: bytes) -> None:
        """Message data as it arrives; a refusal is kept for the end of data."""
        if self.content_refusal is None:
            self.content_refusal = await self.chain.feed(chunk)

    async def end_of_message(
        self,
        incoming: IncomingMessage,
        queue: Queue,
        sender: str,
        recipients: list[str],
        first: list[Modifications] | None = None,
    ) -> Finished | Reply:
        """The milters' verdict on the received message: a Reply to send
        instead of committing (a refusal, or a discard's 250: the message is
        dropped), or the message to commit. `first`: the relay's own edits
        (its Authentication-Results header), applied before the milters'."""
        self.in_message = False
        if self.content_refusal is not None:
            await self.chain.abort()
            verdict = MessageVerdict(reply=self.content_refusal)
        else:
            verdict = await self.chain.end_of_message()
        if verdict.reply is None and not verdict.discard:
            verdict.modifications[:0] = first or []
            done = await finish(verdict, incoming, queue, sender, recipients)
            if done.recipients:
                return done
            incoming = done.incoming  # a milter deleted every recipient: nothing to send
        incoming.abort()
        if verdict.reply is not None:
            return verdict.reply
        log.info("%s: milter-discard: from=<%s>", incoming.queue_id, sender)
        return Reply(250, "2.0.0", f"Ok: queued as {incoming.queue_id}")

    async def abort(self) -> None:
        """The transaction ended before its end of data (RSET, HELO, a refusal)."""
        if self.in_message:
            self.in_message = False
            await self.chain.abort()

    def close(self) -> None:
        """SMFIC_QUIT to every milter; never waits (also from a cancelled session)."""
        self.chain.close()


@dataclass
class Finished:
    """The message after the milters' verdict, ready to commit."""

    incoming: IncomingMessage
    sender: str
    recipients: list[str]
    hold_reason: str | None = None


async def finish(
    verdict: MessageVerdict,
    incoming: IncomingMessage,
    queue: Queue,
    sender: str,
    recipients: list[str],
) -> Finished:
    """The message with the verdict's modifications applied; the caller
    commits `incoming` of the result (a new one when the content changed: the
    old one is aborted) and holds it when `hold_reason` says so."""
    mods = verdict.modifications
    try:
        sender, recipients = edit_envelope(sender, recipients, mods)
        if modified(mods):
            incoming = await _copy_edited(incoming, queue, verdict)
    finally:
        verdict.close()
    return Finished(incoming, sender, recipients, verdict.quarantine)


async def _copy_edited(
    original: IncomingMessage, queue: Queue, verdict: MessageVerdict
) -> IncomingMessage:
    """A new queue file: the edited header section, then the body (the
    original's or a milter's replacement). A message still in memory (most:
    relay.queue.incoming.SPILL_BYTES) that keeps its body is edited there: no
    file is written, read back and removed for it."""
    held = original.in_memory()
    body = replacement_body(verdict.modifications)
    if held is not None and body is None:
        edited = _edited_in_memory(held, original, queue, verdict.modifications)
    else:
        edited = await _edited_file_copy(original, queue, verdict.modifications, body)
    original.abort()
    log.info("%s: milter-edited, queued as %s", original.queue_id, edited.queue_id)
    return edited


def _edited_in_memory(
    held: bytes, original: IncomingMessage, queue: Queue, modifications: list[Modifications]
) -> IncomingMessage:
    edited = queue.incoming()
    try:
        # Less than COPY_CHUNK: read_header_section gets all of it in one read.
        section, rest = read_header_section(io.BytesIO(held))
        edited.write(_received_follows(edited_head(section, modifications), original, edited))
        edited.write(rest)
    except BaseException:
        edited.abort()
        raise
    return edited


async def _edited_file_copy(
    original: IncomingMessage,
    queue: Queue,
    modifications: list[Modifications],
    body: IO[bytes] | None,
) -> IncomingMessage:
    """The same from the original's file, in chunks on the queue's I/O threads
    (a 25 MB message, or a replacement body spooled to disk, is never held)."""
    path = await original.flush()
    src: IO[bytes] = await queue.run_io(open, path, "rb")
    edited = queue.incoming()
    try:
        section, rest = await queue.run_io(read_header_section, src)
        edited.write(_received_follows(edited_head(section, modifications), original, edited))
        if body is not None:
            await queue.run_io(body.seek, 0)
            source: IO[bytes] = body
        else:
            source = src
            edited.write(rest)
        while chunk := await queue.run_io(source.read, COPY_CHUNK):
            edited.write(chunk)
            await edited.drain()
    except BaseException:
        edited.abort()
        raise
    finally:
        with contextlib.suppress(OSError):
            await queue.run_io(src.close)
    return edited


def _received_follows(head: bytes, original: IncomingMessage, edited: IncomingMessage) -> bytes:
    """Our Received header names the queue file: it follows the message to its copy."""
    return head.replace(f" id {original.queue_id}".encode(), f" id {edited.queue_id}".encode(), 1)


async def hold(queue: Queue, queue_id: str, reason: str) -> None:
    """Moves a just-committed message to hold/ (a milter's or DMARC's quarantine)."""
    await queue.hold_fresh(queue_id)
    log.info("%s: hold: %s", queue_id, reason)
