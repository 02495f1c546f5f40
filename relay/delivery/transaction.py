"""One SMTP transaction of delivery: MAIL, RCPT..., DATA and the message.

`run_transaction()` takes an open, EHLO'd connection and one message for
some recipients; it fills one RecipientResult per recipient and says what
to do with the connection (Outcome). It never raises.

One state machine for both kinds of next hop: commands go out in windows
(all of MAIL, RCPTs and DATA in one write when the peer offers PIPELINING,
RFC 2920, as Postfix's smtp client does; one at a time without it), replies
are read in order by relay.delivery.replies. Without PIPELINING nothing
more is said once MAIL or every RCPT is refused; with it, a DATA accepted
for no recipient is ended at once. A failed transaction is reset (RSET).

The message goes out through DataEncoder, chunk by chunk from the queue:
CRLF, bare LF and bare CR all become CRLF, then dot-stuffing. Outgoing mail
therefore never carries a bare CR or LF, whatever was received. Envelope
addresses are checked here (check_address) and sent as is.
"""

from __future__ import annotations

import enum
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib import SMTPResponse

from relay.delivery.replies import Borrowed, ReplyError, ReplyReader
from relay.queue.mailparams import NO_PARAMS, MailParams


class ResultKind(enum.StrEnum):
    """What became of one recipient (stored as is in the queue's progress)."""

    SENT = "sent"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


SENT, DEFERRED, BOUNCED = ResultKind.SENT, ResultKind.DEFERRED, ResultKind.BOUNCED


class Outcome(enum.Enum):
    """What to do with the connection after a transaction."""

    KEEP = enum.auto()  # in step with the peer: back to the pool
    CLOSE = enum.auto()  # closed, or out of step: gone
    RETRY = enum.auto()  # a reused connection was dead before MAIL was answered: take another


# The message data as an async iterator of chunks; called again for each
# next hop of one message.
ChunkSource = Callable[[], AsyncIterator[bytes]]

# The command whose reply is awaited, as the logs and DSNs name it (Postfix's words).
MAIL_STAGE, RCPT_STAGE, DATA_STAGE, END_STAGE = "MAIL FROM", "RCPT TO", "DATA", "end of DATA"

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")
_LINE_ENDS = re.compile(rb"\r\n|\n|\r")
# Outside a quoted local part an address may hold no space, control
# character, angle bracket or quote (what could end or extend the command).
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\x00-\x1f\x7f]|\\[^\x00-\x1f\x7f])*"')
_UNSAFE = re.compile(r'[\s<>"\x00-\x1f\x7f]')


class AddressError(ValueError):
    """An envelope address that cannot be put on an SMTP command line."""


def check_address(address: str) -> None:
    if any(c in address for c in "\r\n\x00"):
        raise AddressError("address contains CR, LF or NUL")
    if not address.isascii():
        try:
            address.encode()
        except UnicodeEncodeError:  # bytes that were not UTF-8 (surrogate escapes)
            raise AddressError("address is not valid UTF-8") from None
    rest = _QUOTED_LOCAL.sub("", address, count=1)
    if _UNSAFE.search(rest):
        raise AddressError(f"address {address!r} contains characters not allowed in a mailbox")


@dataclass
class RecipientResult:
    recipient: str
    kind: ResultKind
    reply: str  # what the log and the DSN show, e.g. "250 2.0.0 Ok" or our own reason
    status: str  # enhanced status code
    relay: str = "none"  # host[ip]:port
    smtp_reply: bool = True  # reply came from the next hop (else our own text)
    in_reply_to: str = ""  # which command the reply answered
    # SENT to a next hop that offers DSN, with the recipient's NOTIFY/ORCPT:
    # success notices are its job now, not ours (no "relayed" DSN).
    dsn_passed: bool = False


def enhanced_status(code: int, message: str) -> str:
    m = _ENHANCED.match(message + " ")
    if m:
        return m.group(1)
    return f"{str(code)[0]}.0.0" if code else "4.0.0"


def defer_unfinished(
    recipients: list[str], results: dict[str, RecipientResult], reason: str, label: str
) -> None:
    """A lost or failed conversation: every recipient not already bounced is deferred."""
    for r in recipients:
        if r not in results or results[r].kind != BOUNCED:
            results[r] = RecipientResult(r, DEFERRED, reason, "4.4.2", label, False)


class DataEncoder:
    """Turns message bytes into the DATA stream, chunk by chunk.

    Line ends become CRLF (a CR at a chunk's end waits for the next chunk),
    lines starting with "." get another one, the end gets CRLF "." CRLF.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._at_line_start = True

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk
        if data.endswith(b"\r"):
            self._carry, data = b"\r", data[:-1]
        else:
            self._carry = b""
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
            # Some bare CR or LF (queued mail has none, but be safe): normalise.
            data = _LINE_ENDS.sub(b"\r\n", data)
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        self._at_line_start = data.endswith(b"\r\n")
        return data

    def end(self) -> bytes:
        tail = b"\r\n" if self._carry else b""
        if self._carry:
            self._at_line_start = True
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"


async def send_data(reader: ReplyReader, chunks: ChunkSource) -> None:
    """The message after 354, streamed: never more than one chunk in memory."""
    encoder = DataEncoder()
    last = b""  # held back so that the final dot goes out in the same write
    async for chunk in chunks():
        out = encoder.feed(chunk)
        if out:
            if last:
                reader.write(last)
                await reader.drain()  # back-pressure: the peer sets the pace
            last = out
    reader.write(last + encoder.end())


class _Exchange:
    """The state machine of one transaction on a borrowed connection."""

    def __init__(
        self, label: str, recipients: list[str], results: dict[str, RecipientResult]
    ) -> None:
        self.label = label
        self.recipients = recipients
        self.results = results
        self.stage = MAIL_STAGE
        self.accepted: list[str] = []
        self.delivered = False  # the final dot was answered 250: no RSET
        self.dsn_passed = False  # the DSN parameters went to the next hop

    def fail(self, resp: SMTPResponse, names: list[str], stage: str) -> None:
        kind = BOUNCED if resp.code >= 500 else DEFERRED
        reply = f"{resp.code} {resp.message}"
        status = enhanced_status(resp.code, resp.message)
        for r in names:
            self.results[r] = RecipientResult(r, kind, reply, status, self.label, True, stage)

    async def run(
        self,
        reader: ReplyReader,
        commands: list[bytes],
        window: int,
        chunks: ChunkSource,
        timeout: float,
    ) -> None:
        """`commands` are MAIL, the RCPTs and DATA; up to `window` of them go
        out in one write whenever every reply so far is in."""
        total = len(commands)
        data_at = total - 1
        sent = replied = 0
        mail_ok = True
        data_reply: SMTPResponse | None = None
        while replied < total:
            if replied == sent:
                if not mail_ok or (sent == data_at and not self.accepted):
                    return  # nothing more to say that could succeed
                sent = min(total, sent + window)
                reader.write(b"".join(commands[replied:sent]))
            self.stage = (
                MAIL_STAGE if replied == 0 else RCPT_STAGE if replied < data_at else DATA_STAGE
            )
            reply = await reader.next_reply(timeout)
            if replied == 0:
                mail_ok = reply.code == 250
                if not mail_ok:
                    self.fail(reply, self.recipients, MAIL_STAGE)
            elif replied == data_at:
                data_reply = reply
            elif mail_ok:  # (after a refused MAIL, RCPT replies mean nothing)
                r = self.recipients[replied - 1]
                if reply.code in (250, 251):
                    self.accepted.append(r)
                else:
                    self.fail(reply, [r], RCPT_STAGE)
            replied += 1
        assert data_reply is not None
        if data_reply.code != 354:
            self.fail(data_reply, self.accepted, DATA_STAGE)
            return
        self.stage = END_STAGE
        if self.accepted:
            await send_data(reader, chunks)
        else:
            # RFC 2920: DATA was accepted though no recipient was; end it at
            # once (the server must refuse an empty one).
            reader.write(b".\r\n")
        final = await reader.next_reply(timeout)
        if not self.accepted:
            return
        if final.code != 250:
            self.fail(final, self.accepted, END_STAGE)
            return
        text, status = f"250 {final.message}", enhanced_status(250, final.message)
        for r in self.accepted:
            self.results[r] = RecipientResult(
                r, SENT, text, status, self.label, dsn_passed=self.dsn_passed
            )
        self.delivered = True


async def run_transaction(
    smtp: aiosmtplib.SMTP,
    label: str,
    sender: str,
    recipients: list[str],
    chunks: ChunkSource,
    results: dict[str, RecipientResult],
    *,
    reused: bool,
    pipelining: bool,
    timeout: float,
    params: MailParams = NO_PARAMS,
    utf8_headers: bool = False,
) -> Outcome:
    """Sends one message over `smtp` (connected to `label`, host[ip]:port);
    fills `results` for every recipient unless the outcome is RETRY.
    `utf8_headers`: the message's headers are not all ASCII."""
    options = []
    ascii_envelope = sender.isascii() and all(r.isascii() for r in recipients)
    if not smtp.supports_extension("smtputf8"):
        # Postfix: a message that needs SMTPUTF8 (UTF-8 in the envelope, or
        # SMTPUTF8 requested and UTF-8 in the headers) is not sent without it.
        if not ascii_envelope or (params.smtputf8 and utf8_headers):
            reason = f"SMTPUTF8 is required, but was not offered by host {label}"
            for r in recipients:
                results[r] = RecipientResult(r, BOUNCED, reason, "5.6.7", label, False)
            return Outcome.KEEP
    elif params.smtputf8 or not ascii_envelope:
        options.append(b"SMTPUTF8")
    if smtp.supports_extension("8bitmime"):
        options.append(b"BODY=7BIT" if params.body == "7BIT" else b"BODY=8BITMIME")
    exchange = _Exchange(label, recipients, results)
    exchange.dsn_passed = smtp.supports_extension("dsn")
    if exchange.dsn_passed and params.esmtp_mail():
        options.append(params.esmtp_mail().encode())
    commands = [b" ".join([b"MAIL FROM:<" + sender.encode() + b">", *options]) + b"\r\n"]
    for r in recipients:
        rcpt_options = " " + params.recipient(r).next_hop_esmtp(r) if exchange.dsn_passed else ""
        commands.append(b"RCPT TO:<" + r.encode() + b">" + rcpt_options.encode() + b"\r\n")
    commands.append(b"DATA\r\n")
    window = len(commands) if pipelining and smtp.supports_extension("pipelining") else 1

    async def converse(reader: ReplyReader) -> None:
        await exchange.run(reader, commands, window, chunks, timeout)

    return await _conversation(smtp, exchange, converse, reused=reused)


async def run_probe(
    smtp: aiosmtplib.SMTP,
    label: str,
    recipient: str,
    results: dict[str, RecipientResult],
    *,
    reused: bool,
    timeout: float,
) -> Outcome:
    """verify(8)'s probe: MAIL FROM:<>, RCPT TO, then RSET; never DATA.
    The recipient's result is SENT when the RCPT was accepted."""
    exchange = _Exchange(label, [recipient], results)

    async def converse(reader: ReplyReader) -> None:
        reader.write(b"MAIL FROM:<>\r\n")
        mail = await reader.next_reply(timeout)
        if mail.code != 250:
            exchange.fail(mail, [recipient], MAIL_STAGE)
            return
        exchange.stage = RCPT_STAGE
        reader.write(b"RCPT TO:<" + recipient.encode() + b">\r\n")
        rcpt = await reader.next_reply(timeout)
        if rcpt.code not in (250, 251):
            exchange.fail(rcpt, [recipient], RCPT_STAGE)
            return
        text, status = f"{rcpt.code} {rcpt.message}", enhanced_status(rcpt.code, rcpt.message)
        results[recipient] = RecipientResult(recipient, SENT, text, status, label, True, RCPT_STAGE)

    return await _conversation(smtp, exchange, converse, reused=reused)


async def _conversation(
    smtp: aiosmtplib.SMTP,
    exchange: _Exchange,
    converse: Callable[[ReplyReader], Awaitable[None]],
    *,
    reused: bool,
) -> Outcome:
    """Runs `converse` on the connection: a lost or failed conversation
    defers what has no result, a transaction not delivered is reset."""
    label, recipients, results = exchange.label, exchange.recipients, exchange.results
    try:
        async with Borrowed(smtp) as reader:
            await converse(reader)
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as e:
        smtp.close()
        if reused and exchange.stage == MAIL_STAGE:
            return Outcome.RETRY
        reason = f"lost connection with {label} while sending {exchange.stage}: {e}"
        defer_unfinished(recipients, results, reason, label)
        return Outcome.CLOSE
    except (ReplyError, aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        smtp.close()
        reason = (
            f"conversation with {label} timed out or failed while sending {exchange.stage}: {e}"
        )
        defer_unfinished(recipients, results, reason, label)
        return Outcome.CLOSE
    if not exchange.delivered:
        await _rset(smtp)
    return Outcome.KEEP if smtp.is_connected else Outcome.CLOSE


async def _rset(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.execute_command(b"RSET", timeout=30)
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()
