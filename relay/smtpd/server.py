"""The SMTP protocol of the relay's server: greeting, command loop, and the
commands outside a mail transaction.

aiosmtpd's protocol class is the connection's base, its input and output run
on the protocol itself (relay.smtpd.aiosmtpd_adapter);
the layers of one session, each a class of its own module:
  SmtpConnection (relay.smtpd.connection)   stream callbacks, idle timer, replies
  MailTransaction (relay.smtpd.transaction) MAIL, RCPT, DATA, RSET
  RelaySMTP (here)                          PROXY, anvil, postscreen, greeting,
                                            the command loop, HELO/EHLO, STARTTLS ...
What a store-and-forward MX needs and aiosmtpd's own loop does not do:
- no per-connection introspection: commands dispatch from one class-level
  table, and there is no AUTH at all (port 25);
- Postfix's replies, with enhanced status codes on every one, its error
  counting (421 after smtpd_hard_error_limit) and pipelining detection;
- the postscreen hook between accept and the final "220 " line;
- the restrictions of each stage in relay.smtpd.policy: CONNECT before the
  greeting, HELO here, the others in relay.smtpd.transaction.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import ClassVar

from relay import metrics, tlslog
from relay.smtpd import hygiene, policy
from relay.smtpd.context import ServerContext
from relay.smtpd.hygiene import printable
from relay.smtpd.miltersession import SessionMilters, tls_macros
from relay.smtpd.policy import in_mynetworks
from relay.smtpd.proxy import accept_proxy
from relay.smtpd.session import Reply, ScreenResult, client_name
from relay.smtpd.transaction import MAIL_NAME, MailTransaction

__all__ = ["HARD_ERROR_LIMIT", "RelaySMTP", "ServerContext"]

log = logging.getLogger("mailrelay.smtpd")

HARD_ERROR_LIMIT = 20  # smtpd_hard_error_limit's default; limits.errorsPerSession sets it
COMMAND_LINE_LIMIT = 2048  # Postfix line_length_limit
TLS_HANDSHAKE_TIMEOUT = 30.0
# Commands that must end a pipelined group (RFC 2920); anything after them in
# the same read is "improper command pipelining" (Postfix).
LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "STARTTLS", "VRFY", "EXPN", "NOOP"})
# Postfix smtpd_forbidden_commands: a web proxy or HTTP client, not SMTP.
FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST"})

Command = Callable[["RelaySMTP", str], Awaitable[None]]


# Built once per configuration, not per session.
@functools.lru_cache(maxsize=16)
def greeting(hostname: str) -> bytes:
    return f"220 {hostname} ESMTP {MAIL_NAME}\r\n".encode()


@functools.lru_cache(maxsize=16)
def ehlo_reply(hostname: str, message_size: int, starttls: bool) -> bytes:
    lines = [hostname, "PIPELINING", f"SIZE {message_size}"]
    if starttls:
        lines.append("STARTTLS")
    # In Postfix's order; DSN and SMTPUTF8 as with smtputf8_enable=yes.
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8"]
    return ("".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n").encode()


class RelaySMTP(MailTransaction):
    """One client connection."""

    COMMANDS: ClassVar[dict[str, Command]] = {}
    # Every command but QUIT, once CLIENT_RESTRICTIONS refused the client.
    ACCESS_DENIED: ClassVar[dict[str, Command]] = {}

    def __init__(self, ctx: ServerContext, *, via_proxy: bool = False) -> None:
        super().__init__(ctx)
        # On the proxy listener: a PROXY header comes first (relay.smtpd.proxy).
        self.via_proxy = via_proxy
        self.commands = self.COMMANDS

    # -- the session -----------------------------------------------------------

    async def serve(self) -> None:
        """Admission, then the command loop (inline: one coroutine frame per wakeup)."""
        s = self.state
        try:
            if not await self._admit():
                return
            while self.transport is not None and not self._closing:
                if s.errors >= self.config.limits.errors_per_session:
                    log.info("too many errors after %s from %s", self._last_command, client_name(s))
                    await self.reply(
                        421, "4.7.0", f"{self.hostname} Error: too many errors", disconnect=True
                    )
                    return
                if self.ctx.shutting_down and self.txn is None:
                    self.close_with(self.ctx.shutdown_reply())
                    return
                line = await self._read_command()
                if line is None:
                    continue
                await self._dispatch(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_with_nothing()
        except Exception:
            # A session never dies silently: logged once, and the client told.
            log.exception(
                "internal error after %s from %s", self._last_command, client_name(self.state)
            )
            self.internal_error()
        finally:
            if self.milters is not None:
                self.milters.close()
            if log.isEnabledFor(logging.DEBUG):  # no client_name per session otherwise
                log.debug("disconnect from %s", client_name(s))

    async def _admit(self) -> bool:
        """From accept to the greeting: PROXY, anvil, postscreen, CLIENT_RESTRICTIONS.
        False when the session ends here."""
        s = self.state
        if self.via_proxy:
            # The real client's IP replaces the load balancer's before anything
            # (mynetworks, anvil, postscreen, logs) looks at it.
            if not await accept_proxy(s, self, self.config.proxy_protocol):
                self.close_with_nothing()
                return False
            s.trusted = in_mynetworks(self.config, s.client_ip)
        metrics.CONNECTIONS.inc()
        if log.isEnabledFor(logging.DEBUG):  # decisions only at INFO
            log.debug("connect from %s", client_name(s))
        refused = self.ctx.anvil.connect(s, self.config.limits, self.hostname)
        if not s.trusted:
            self._anvil_ip = s.client_ip
        if refused is not None:
            await self.send(refused)
            return False
        if not await self._screen():
            return False
        refused = None
        if policy.CLIENT_RESTRICTIONS:  # empty by default: nothing to run per connection
            refused = await policy.check_client(self.check)
        self.milters = SessionMilters.for_session(self.config, s)
        if refused is None and self.milters is not None:
            refused = await self.milters.connect()
        if refused is not None:
            # Postfix with smtpd_delay_reject=no: the reject instead of the
            # greeting, then 503 to every command but QUIT.
            log.info("NOQUEUE: reject: CONNECT from %s: %s", client_name(s), refused)
            self.commands = self.ACCESS_DENIED
            await self.send(refused)
            return True
        await self._write(greeting(self.hostname))
        return True

    async def _screen(self) -> bool:
        """postscreen's verdict; False when it drops the client."""
        s = self.state
        try:
            s.screen = await self.ctx.postscreen.screen(s, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_with_nothing()
            return False
        except Exception:
            log.exception("postscreen failed for %s; letting the client in", client_name(s))
            s.screen = ScreenResult()
        if s.screen.action != "drop":
            return True
        reply = s.screen.reply
        if reply is None:  # e.g. the client hung up during the screen
            self.close_with_nothing()
            return False
        log.info("DISCONNECT %s: %s", client_name(s), reply)
        await self.send(Reply(reply.code, reply.status, reply.text, disconnect=True))
        return False

    async def _read_command(self) -> bytes | None:
        line = self.take_line()  # nearly always here already: no await
        if line is None:
            line = await self._wait_for_command()
            if line is None:
                return None
        if len(line) > COMMAND_LINE_LIMIT:
            await self.reply(500, "5.5.2", "Error: line too long")
            return None
        return line

    async def _wait_for_command(self) -> bytes | None:
        """The next command line when it is not buffered yet (or too long)."""
        self.idle = self.txn is None
        if self._held:
            await self._write(b"")  # never wait for input with replies unsent
        try:
            return await self.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            # Longer than anything we keep: skip to the end of the line.
            await self.readexactly(e.consumed)
            while True:
                try:
                    await self.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self.readexactly(more.consumed)
            await self.reply(500, "5.5.2", "Error: line too long")
            return None
        finally:
            self.idle = False

    async def _dispatch(self, line: bytes) -> None:
        # Postfix 3.9 normalize: a command may end in a bare LF.
        text = line.rstrip(b"\n")
        if text.endswith(b"\r"):
            text = text[:-1]
        decoded = hygiene.decode_command(text)
        if decoded is None:
            # Postfix (smtputf8_enable=yes), for any command: nothing that is
            # not UTF-8 gets into the envelope, the logs or a header.
            self._last_command = "UNKNOWN"
            await self.reply(500, "5.5.2", "Error: bad UTF-8 syntax")
            return
        word, _, arg = decoded.partition(" ")
        command = word.upper()
        arg = arg.strip(" \t")
        handler = self.commands.get(command)
        # Postfix logs an unrecognised command as UNKNOWN: never its bytes.
        self._last_command = command if handler is not None else "UNKNOWN"
        if command in FORBIDDEN_COMMANDS:
            log.warning("non-SMTP command from %s: %s", client_name(self.state), printable(command))
            await self.reply(
                521, "5.7.0", "Error: I can break rules, too. Goodbye.", disconnect=True
            )
            return
        if handler is None:
            await self.reply(502, "5.5.2", "Error: command not recognized")
            return
        if command in hygiene.JUNK_COMMANDS:
            if hygiene.junk_is_error(self.state.junk_commands):
                self.state.errors += 1
            self.state.junk_commands += 1
        self._note_pipelining(command)
        self.reset_timeout()
        await handler(self, arg)

    def _note_pipelining(self, command: str) -> None:
        """Postfix's improper-pipelining flag: input waiting after a command
        that must wait for its reply (or any command, without EHLO)."""
        if self.state.unauth_pipelining or command == "QUIT":
            return
        if (command in LAST_IN_GROUP or not self.state.esmtp) and self.pending_input:
            self.state.unauth_pipelining = True
            log.info(
                "improper command pipelining after %s from %s", command, client_name(self.state)
            )

    # -- commands outside a transaction ------------------------------------------

    async def smtp_HELO(self, arg: str) -> None:
        if not arg:
            await self.reply(501, "5.5.4", "Syntax: HELO hostname")
            return
        if policy.HELO_RESTRICTIONS and await self._helo_refused(arg):
            return
        if self.milters is not None and await self._milter_helo_refused(arg):
            return
        # As Postfix's helo_cmd: the name is kept printable (it goes into
        # Received:, Received-SPF: and log lines).
        self.state.helo = printable(arg)
        self.state.esmtp = False
        self.end_transaction()
        await self.reply(250, "", self.hostname)

    async def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            await self.reply(501, "5.5.4", "Syntax: EHLO hostname")
            return
        if policy.HELO_RESTRICTIONS and await self._helo_refused(arg):
            return
        if self.milters is not None and await self._milter_helo_refused(arg):
            return
        self.state.helo = printable(arg)
        self.state.esmtp = True
        self.end_transaction()
        starttls = self.ctx.tls_context is not None and not self.state.tls
        await self._write(ehlo_reply(self.hostname, self.config.limits.message_size, starttls))

    async def _helo_refused(self, name: str) -> bool:
        """HELO_RESTRICTIONS on the name given (empty by default: not run per
        session). A refused name is not kept."""
        s = self.state
        previous, s.helo = s.helo, name
        refused = await policy.check_helo(self.check)
        if refused is None:
            return False
        s.helo = previous
        log.info("NOQUEUE: reject: HELO from %s: %s", client_name(s), refused)
        await self.send(refused)
        return True

    async def _milter_helo_refused(self, name: str) -> bool:
        """The milters' HELO event (after HELO_RESTRICTIONS, as Postfix)."""
        assert self.milters is not None
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        refused = await self.milters.helo(name, tls_macros(ssl_object))
        if refused is None:
            return False
        log.info("NOQUEUE: milter-reject: HELO from %s: %s", client_name(self.state), refused)
        await self.send(refused)
        return True

    async def smtp_NOOP(self, arg: str) -> None:
        await self.reply(250, "2.0.0", "Ok")

    async def smtp_QUIT(self, arg: str) -> None:
        await self.reply(221, "2.0.0", "Bye", disconnect=True)

    async def smtp_VRFY(self, arg: str) -> None:
        await self.reply(502, "5.5.1", "VRFY command is disabled")

    async def access_denied(self, arg: str) -> None:
        await self.reply(503, "5.7.0", f"Error: access denied for {client_name(self.state)}")

    async def smtp_AUTH(self, arg: str) -> None:
        await self.reply(503, "5.5.1", "Error: authentication not enabled")

    async def smtp_STARTTLS(self, arg: str) -> None:
        tls = self.ctx.tls_context
        if tls is None:
            await self.reply(502, "5.5.1", "Error: command not implemented")
            return
        if self.state.tls:
            await self.reply(554, "5.5.1", "Error: TLS already active")
            return
        if arg:
            await self.reply(501, "5.5.4", "Syntax: STARTTLS")
            return
        await self.reply(220, "2.0.0", "Ready to start TLS")
        # Whatever the client sent after STARTTLS in plaintext must never be
        # read as commands (CVE-2011-0411, CVE-2024-34083). loop.start_tls
        # swaps the protocol before it first yields, so nothing plaintext can
        # land in the buffer after this.
        self.pending_input.clear()
        if self.transport is None:  # gone while the 220 went out
            return
        try:
            new_transport = await self.loop.start_tls(
                self.transport,
                self,
                tls,
                server_side=True,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            log.info("TLS handshake failed for %s: %s", client_name(self.state), e)
            self.close_with_nothing()
            return
        if new_transport is None:
            self.close_with_nothing()
            return
        self.use_tls_transport(new_transport)
        tlslog.session(
            log,
            new_transport.get_extra_info("ssl_object"),
            inbound=True,
            peer=client_name(self.state),
            verified=bool(new_transport.get_extra_info("peercert")),
        )
        # RFC 3207: forget everything learned before TLS.
        self.state.tls = True
        self.state.helo = None
        self.state.esmtp = False
        self.end_transaction()


RelaySMTP.COMMANDS = {
    "HELO": RelaySMTP.smtp_HELO,
    "EHLO": RelaySMTP.smtp_EHLO,
    "MAIL": RelaySMTP.smtp_MAIL,
    "RCPT": RelaySMTP.smtp_RCPT,
    "DATA": RelaySMTP.smtp_DATA,
    "RSET": RelaySMTP.smtp_RSET,
    "NOOP": RelaySMTP.smtp_NOOP,
    "QUIT": RelaySMTP.smtp_QUIT,
    "VRFY": RelaySMTP.smtp_VRFY,
    "AUTH": RelaySMTP.smtp_AUTH,
    "STARTTLS": RelaySMTP.smtp_STARTTLS,
}
RelaySMTP.ACCESS_DENIED = {
    name: RelaySMTP.smtp_QUIT if name == "QUIT" else RelaySMTP.access_denied
    for name in RelaySMTP.COMMANDS
}
