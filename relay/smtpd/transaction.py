"""The mail transaction of the SMTP protocol: MAIL, RCPT, DATA, RSET.

The protocol's own checks are here (command sequence, syntax, the
session's limits: anvil rates, recipients per message, message size while
DATA streams, queue write errors). What to accept is the policy's: at MAIL,
RCPT, DATA and end of DATA this module runs that stage's restriction table
(relay.smtpd.policy) and sends its reply.

DATA streams to the queue in chunks through relay.smtpd.smtpdata (no
message in memory, long lines kept, bare CR/LF normalized, no smuggling);
the attachment filter (relay.smtpd.content) reads it as it arrives, and its
verdict is END_OF_DATA_RESTRICTIONS' `content`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import time
from datetime import UTC, datetime

from relay import logbuffer, metrics
from relay.queue.incoming import IncomingMessage
from relay.smtpd import content, hygiene, policy
from relay.smtpd.addresses import AddressError, esmtp_param_items, parse_path
from relay.smtpd.connection import SmtpConnection
from relay.smtpd.context import ServerContext
from relay.smtpd.esmtpparams import mail_params, rcpt_params
from relay.smtpd.hygiene import printable
from relay.smtpd.milters import MessageVerdict
from relay.smtpd.miltersession import SessionMilters, finish, hold
from relay.smtpd.policy import Check
from relay.smtpd.session import Reply, Session, Transaction, client_name
from relay.smtpd.smtpdata import DataDecoder, HopCount, MessageIdPeek

log = logging.getLogger("mailrelay.smtpd")

MAIL_NAME = "mailrelay"
DATA_CHUNK = 256 * 1024
FLUSH_EVERY = 1024 * 1024  # bytes of DATA between waits for the queue's writes

_date_cache: tuple[int, str] = (0, "")


def rfc5322_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.format_datetime(datetime.fromtimestamp(now, UTC)))
    return _date_cache[1]


def received_header(
    session: Session, hostname: str, queue_id: str, recipients: list[str], *, smtputf8: bool = False
) -> bytes:
    proto = "ESMTPS" if session.tls else "ESMTP" if session.esmtp else "SMTP"
    if smtputf8:  # RFC 6531 (and Postfix): "with UTF8SMTP", "UTF8SMTPS"
        proto = "UTF8SMTPS" if session.tls else "UTF8SMTP"
    helo = printable(session.helo or "unknown")
    reverse = printable(session.reverse_name or "unknown")
    for_part = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    return (
        f"Received: from {helo} ({reverse} [{session.client_ip}])\r\n"
        f"\tby {hostname} ({MAIL_NAME}) with {proto} id {queue_id}{for_part};"
        f" {rfc5322_date()}\r\n"
    ).encode("utf-8", "surrogateescape")


def parse_mail(arg: str, *, esmtp: bool) -> Transaction | Reply:
    """MAIL FROM's argument as a new transaction, or the reply to its syntax error."""
    if arg[:5].upper() != "FROM:":
        return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    try:
        sender, param_text = parse_path(arg[5:])
    except AddressError:
        return Reply(501, "5.1.7", "Bad sender address syntax")
    items = esmtp_param_items(param_text)
    if items is None or (items and not esmtp):
        return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
    parsed = mail_params(items)
    if isinstance(parsed, Reply):
        return parsed
    size, params = parsed
    return Transaction(
        sender=sender.text, mail_options=param_text.split(), size_hint=size, params=params
    )


class MailTransaction(SmtpConnection):
    """The transaction commands of a session (RelaySMTP adds the rest)."""

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.txn: Transaction | None = None
        self.message_id: MessageIdPeek | None = None  # of the message being received
        self.milters: SessionMilters | None = None  # contentFilters.milters, from the greeting on
        # The session's restriction context, filled in at each stage.
        self.check = Check(
            ctx.config,
            self.state,
            None,
            None,
            ctx.dns_checks,
            ctx.spf,
            storage_ok=ctx.storage_ok,
            verifier=ctx.verifier,
            authenticator=ctx.authenticator,
            greylist=ctx.greylist,
        )

    def log_reject(
        self, stage: str, reply: Reply, *, sender: str | None = None, recipient: str | None = None
    ) -> None:
        """Postfix's one line per rejected command:
        NOQUEUE: reject: RCPT from host[ip]: 550 5.1.1 <...>: ...; from=<> to=<> proto=ESMTP helo=<>
        (a 4xx is a reject too, as Postfix logs it)."""
        envelope = "" if sender is None else f" from=<{sender}>"
        if recipient is not None:
            envelope += f" to=<{recipient}>"
        log.info(
            "NOQUEUE: reject: %s from %s: %s;%s proto=%s helo=<%s>",
            stage,
            client_name(self.state),
            reply,
            envelope,
            "ESMTP" if self.state.esmtp else "SMTP",
            printable(self.state.helo or ""),
        )

    async def need_helo(self) -> bool:
        if self.state.helo is None:
            await self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return True
        return False

    def end_transaction(self) -> None:
        self.txn = None
        c = self.check
        c.transaction = c.rcpt = c.content = c.hops = None
        c.message = c.authenticated = None

    async def smtp_MAIL(self, arg: str) -> None:
        if await self.need_helo():
            return
        if self.txn is not None:
            await self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if self.ctx.shutting_down:
            await self.send(self.ctx.shutdown_reply())
            self.close_with_nothing()
            return
        # Each transaction sees the configuration current when it starts.
        self.config = self.check.config = self.ctx.config
        refused = self.ctx.anvil.message(self.state, self.config.limits)
        if refused is not None:
            self.log_reject("MAIL", refused)
            await self.send(refused)
            return
        txn = parse_mail(arg, esmtp=self.state.esmtp)
        if isinstance(txn, Reply):
            await self.send(txn)
            return
        self.check.transaction = txn
        verdict = await policy.check_sender(self.check)
        if verdict is None and self.milters is not None:
            verdict = await self.milters.mail(txn.sender, txn.mail_options)
        if verdict is not None:
            self.check.transaction = None
            self.log_reject("MAIL", verdict, sender=txn.sender)
            await self.send(verdict)
            return
        self.txn = txn
        await self.reply(250, "2.1.0", "Ok")

    async def _no_transaction(self) -> None:
        """The reply to RCPT or DATA outside a transaction."""
        if not await self.need_helo():
            await self.reply(503, "5.5.1", "Error: need MAIL command")

    async def smtp_RCPT(self, arg: str) -> None:
        txn = self.txn
        if txn is None:  # (also without HELO: HELO, EHLO and STARTTLS end it)
            await self._no_transaction()
            return
        if arg[:3].upper() != "TO:":
            await self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        refused = self.ctx.anvil.recipient(self.state, self.config.limits)
        if refused is not None:
            self.log_reject("RCPT", refused, sender=txn.sender)
            await self.send(refused)
            return
        try:
            rcpt, param_text = parse_path(arg[3:])
        except AddressError:
            await self.reply(501, "5.1.3", "Bad recipient address syntax")
            return
        if rcpt.is_null:
            await self.reply(501, "5.1.3", "Bad recipient address syntax")
            return
        items = esmtp_param_items(param_text)
        if items is None or (items and not self.state.esmtp):
            await self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        params = rcpt_params(items)
        if isinstance(params, Reply):
            await self.send(params)
            return
        # Postfix smtpd_recipient_limit counts every accepted RCPT, repeats too.
        if txn.rcpt_count >= self.config.limits.recipients_per_message:
            metrics.child(metrics.REJECTED, "too_many_recipients").inc()
            too_many = Reply(452, "4.5.3", "Error: too many recipients")
            self.log_reject("RCPT", too_many, sender=txn.sender, recipient=rcpt.original)
            await self.send(too_many)
            return
        self.check.rcpt = rcpt
        verdict = await policy.check_recipient(self.check)
        if verdict is None and self.milters is not None:
            verdict = await self.milters.rcpt(rcpt.text, param_text.split())
        if verdict is not None:
            self.log_reject("RCPT", verdict, sender=txn.sender, recipient=rcpt.original)
            await self.send(verdict)
            return
        txn.rcpt_count += 1
        if rcpt.text not in txn.recipients:
            txn.recipients.append(rcpt.text)
            if params.given:
                txn.rcpt_params[rcpt.text] = params
        await self.reply(250, "2.1.5", "Ok")

    async def smtp_DATA(self, arg: str) -> None:
        txn = self.txn
        if txn is None:  # (also without HELO: HELO, EHLO and STARTTLS end it)
            await self._no_transaction()
            return
        if self.state.screen.action == "enforce":
            # postscreen enforce: the client never gets to send a message.
            await self.reply(554, "5.5.1", "Error: no valid recipients", disconnect=True)
            return
        if not txn.recipients:
            await self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        if arg:
            await self.reply(501, "5.5.4", "Syntax: DATA")
            return
        verdict = await policy.check_data(self.check)
        if verdict is not None:
            self.log_reject("DATA", verdict, sender=txn.sender)
            await self.send(verdict)
            return
        try:
            incoming = self.ctx.queue.incoming()
        except Exception:
            log.exception("cannot create a queue file")
            await self.reply(451, "4.3.0", "Error: queue file write error")
            return
        try:
            if self.milters is not None:
                verdict = await self.milters.data(incoming.queue_id)
                if verdict is not None:
                    incoming.abort()
                    await self.send(verdict)
                    return
            await self._receive_data(txn, incoming)
        except Exception as e:
            incoming.abort()
            if isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
                raise
            log.exception(
                "%s: internal error in DATA from %s", incoming.queue_id, client_name(self.state)
            )
            self.internal_error()
        except BaseException:
            incoming.abort()
            raise
        finally:
            self.end_transaction()

    async def _receive_data(self, txn: Transaction, incoming: IncomingMessage) -> None:
        await self.reply(354, "", "End data with <CR><LF>.<CR><LF>")
        # The attachment filter reads the message as it arrives: no second read.
        check = self.check.content = content.content_check(self.config)
        head = received_header(
            self.state,
            self.hostname,
            incoming.queue_id,
            txn.recipients,
            smtputf8=txn.params.smtputf8,
        )
        if txn.prepend_headers:
            head += b"".join(hygiene.header_safe(h).encode() + b"\r\n" for h in txn.prepend_headers)
        write_failed: Exception | None = None
        try:
            incoming.write(head)
        except Exception as e:
            write_failed = e
        if check is not None:
            check.feed_inline(head)
        hops = self.check.hops = HopCount()
        hops.feed(head)  # our own Received: counts, as Postfix's does in cleanup
        if self.milters is not None:  # milters see our Received header, as with Postfix
            await self.milters.feed(head)
        decoder = DataDecoder()
        read = await self._read_message(decoder, incoming, check, write_failed)
        if read is None:  # the client hung up
            incoming.abort()
            self.close_with_nothing()
            return
        too_big, write_failed = read
        if decoder.rest:
            # Commands pipelined after the final dot belong to the command reader.
            self.push_back(decoder.rest)
        await self._end_of_data(txn, incoming, decoder.size, too_big, write_failed)

    async def _read_message(
        self,
        decoder: DataDecoder,
        incoming: IncomingMessage,
        check: content.ContentCheck | None,
        write_failed: Exception | None,
    ) -> tuple[bool, Exception | None] | None:
        """Streams DATA to the queue file and the content check, up to the
        final dot: (too big, the write error), or None if the client hung up."""
        limit = self.config.limits.message_size
        idle = self.idle_timeout
        too_big = False
        flushed = 0
        message_id = self.message_id = MessageIdPeek()
        hops = self.check.hops or HopCount()
        data_started = self.loop.time()
        while not decoder.done:
            data = self.take(DATA_CHUNK) or await self.read(DATA_CHUNK)
            if not data:
                return None
            chunk = decoder.feed(data)
            # The DATA deadline: the idle timeout, plus time earned by bytes
            # received at smtpd_min_data_rate (never more than an idle timeout ahead).
            earned = data_started + idle + decoder.size / self.ctx.min_data_rate
            self.reset_timeout(max(0.001, min(idle, earned - self.loop.time())))
            if decoder.size > limit:
                too_big = True
            if chunk and not message_id.done:
                message_id.feed(chunk)
            if chunk and not hops.done:
                hops.feed(chunk)
            if chunk and not too_big and write_failed is None:
                try:
                    incoming.write(chunk)
                    if decoder.size - flushed >= FLUSH_EVERY:
                        # Wait for the disk now and then: a client faster than
                        # the disk must not pile up the message in memory.
                        flushed = decoder.size
                        await incoming.flush()
                except Exception as e:
                    write_failed = e
                if check is not None and not check.done:
                    await check.feed(chunk)
                if self.milters is not None:
                    await self.milters.feed(chunk)
        return too_big, write_failed

    async def _end_of_data(
        self,
        txn: Transaction,
        incoming: IncomingMessage,
        size: int,
        too_big: bool,
        write_failed: Exception | None,
    ) -> None:
        """After the final dot: refuse, or commit to the queue and say so."""
        if too_big:
            incoming.abort()
            metrics.child(metrics.REJECTED, "message_size").inc()
            log.info(
                "NOQUEUE: reject: END-OF-MESSAGE from %s: message too big (%d bytes)",
                client_name(self.state),
                size,
            )
            await self.reply(552, "5.3.4", "Error: message file too big")
            return
        if write_failed is not None:
            incoming.abort()
            await self._queue_error(write_failed)
            return
        self.check.message = incoming
        verdict = await policy.check_end_of_data(self.check)
        if verdict is not None:
            incoming.abort()
            log.info(
                "%s: reject: END-OF-MESSAGE from %s: %s; from=<%s> to=<%s>",
                incoming.queue_id,
                client_name(self.state),
                verdict,
                txn.sender,
                ",".join(txn.recipients),
            )
            await self.send(verdict)
            return
        try:
            done = await self._filtered(txn, incoming)
            if isinstance(done, Reply):  # refused or discarded by a milter
                await self.send(done)
                return
            incoming, sender, recipients, hold_reason = done
            params = txn.params
            if txn.rcpt_params or params.recipients:  # dataclasses.replace is slow
                params = dataclasses.replace(params, recipients=txn.rcpt_params)
            queue_id = await incoming.commit(
                sender, recipients, client=self.state.client_ip, params=params
            )
            if hold_reason is not None:
                await hold(self.ctx.queue, queue_id, hold_reason)
        except Exception as e:
            incoming.abort()
            await self._queue_error(e)
            return
        await self._queued(txn, queue_id, size)

    async def _filtered(
        self, txn: Transaction, incoming: IncomingMessage
    ) -> tuple[IncomingMessage, str, list[str], str | None] | Reply:
        """The milters' verdict and edits, and the Authentication-Results header
        (contentFilters.authentication): the message to commit (a new copy when
        its headers changed), its envelope and why to hold it; or the reply when a
        milter refused or discarded it."""
        sender, recipients = txn.sender, txn.recipients
        auth = self.check.authenticated
        first = [auth.edits] if auth is not None else []
        hold_reason = auth.hold_reason if auth is not None else None
        if self.milters is not None:
            done = await self.milters.end_of_message(
                incoming, self.ctx.queue, sender, recipients, first
            )
            if isinstance(done, Reply) and done.code >= 400:
                metrics.child(metrics.REJECTED, "milter").inc()
                log.info(
                    "%s: milter-reject: END-OF-MESSAGE from %s: %s; from=<%s> to=<%s>",
                    incoming.queue_id,
                    client_name(self.state),
                    done,
                    sender,
                    ",".join(recipients),
                )
            if isinstance(done, Reply):
                return done
        elif first:
            done = await finish(
                MessageVerdict(modifications=first), incoming, self.ctx.queue, sender, recipients
            )
        else:
            return incoming, sender, recipients, hold_reason
        if done.hold_reason is not None:
            hold_reason = f"milter quarantine: {done.hold_reason}"
        return done.incoming, done.sender, done.recipients, hold_reason

    async def _queued(self, txn: Transaction, queue_id: str, size: int) -> None:
        s = self.state
        s.messages += 1
        s.errors = 0  # Postfix counts errors "without delivering mail"
        s.junk_commands = 0  # and "the junk command count is reset after mail is delivered"
        metrics.ACCEPTED.inc()
        metrics.ACCEPTED_BYTES.inc(size)
        logbuffer.info(
            log,
            "%s: client=%s, from=<%s>, to=<%s>, size=%d, nrcpt=%d (queue active)",
            queue_id,
            client_name(s),
            txn.sender,
            ">,<".join(txn.recipients),
            size,
            len(txn.recipients),
        )
        message_id = printable(self.message_id.value()) if self.message_id else ""
        logbuffer.info(log, "%s: message-id=%s", queue_id, message_id or "<>")
        try:
            await self.reply(250, "2.0.0", f"Ok: queued as {queue_id}")
        finally:
            # Also when the client hangs up right after the 250 (connection_lost
            # cancels this task): otherwise the message stays a fresh claim that
            # no scan picks up, until a restart.
            if self.ctx.on_queued is not None:
                self.ctx.on_queued(queue_id)

    async def _queue_error(self, error: Exception) -> None:
        log.error("queue write error from %s: %s", client_name(self.state), error)
        metrics.child(metrics.REJECTED, "queue_error").inc()
        await self.reply(451, "4.3.0", "Error: queue file write error")

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self.end_transaction()
        await self.reply(250, "2.0.0", "Ok")
