"""The relay's SMTP server: an aiosmtpd SMTP subclass.

aiosmtpd gives us the connection plumbing (protocol, timeouts, stream
reader/writer). Everything a store-and-forward MX needs and aiosmtpd does not
do is overridden here:
- no per-connection introspection (aiosmtpd's __init__ builds its AUTH table
  with inspect.getmembers, ~0.5 ms a connection): commands dispatch from one
  class-level table, and there is no AUTH at all (port 25);
- Postfix's replies, with enhanced status codes on every one, its error
  counting (421 after smtpd_hard_error_limit) and pipelining detection;
- the postscreen hook between accept and the final "220 " line;
- DATA streams to the queue in chunks through relay.smtpd.smtpdata (no message in
  memory, long lines kept, bare CR/LF normalized, no smuggling);
- addresses parsed by relay.smtpd.addresses, RCPT decided by relay.smtpd.policy.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiosmtpd.smtp import SMTP

from relay import logbuffer, metrics
from relay.config import RelayConfig
from relay.queue.store import Queue
from relay.smtpd import content, hygiene
from relay.smtpd.addresses import AddressError, parse_esmtp_params, parse_path
from relay.smtpd.anvil import Anvil
from relay.smtpd.dnschecks import DnsChecks
from relay.smtpd.hygiene import printable
from relay.smtpd.policy import Check, Transaction, check_recipient, in_mynetworks
from relay.smtpd.proxy import accept_proxy
from relay.smtpd.screen import Postscreen
from relay.smtpd.session import Envelope, Reply, ScreenResult, Session
from relay.smtpd.smtpdata import DataDecoder
from relay.smtpd.spf import SpfChecker

log = logging.getLogger("mailrelay.smtpd")

MAIL_NAME = "mailrelay"
HARD_ERROR_LIMIT = 20  # smtpd_hard_error_limit's default; limits.errorsPerSession sets it
COMMAND_LINE_LIMIT = 2048  # Postfix line_length_limit
READ_LIMIT = 64 * 1024  # StreamReader limit: also its flow-control window
DATA_CHUNK = 256 * 1024
FLUSH_EVERY = 1024 * 1024  # bytes of DATA between waits for the queue's writes
IDLE_TIMEOUT = 300.0  # Postfix smtpd_timeout
# Postfix smtpd_min_data_rate: during DATA each byte buys this much more time
# beyond the idle timeout, so a client trickling its message cannot hold a
# session (and its per-client connection slot) for ever.
MIN_DATA_RATE = 500.0  # bytes per second
TLS_HANDSHAKE_TIMEOUT = 30.0
# Postfix refuses MAIL when the queue's file system has less free space than
# 1.5 x message_size_limit.
FREE_SPACE_FACTOR = 1.5
# Commands that must end a pipelined group (RFC 2920); anything after them in
# the same read is "improper command pipelining" (Postfix).
LAST_IN_GROUP = frozenset({"EHLO", "HELO", "DATA", "STARTTLS", "VRFY", "EXPN", "NOOP"})
# Commands that may stand anywhere in a pipelined group (RFC 2920): their
# replies may wait for the group's last one.
GROUP_MEMBERS = frozenset({"MAIL", "RCPT", "RSET"})
# Postfix smtpd_forbidden_commands: a web proxy or HTTP client, not SMTP.
FORBIDDEN_COMMANDS = frozenset({"CONNECT", "GET", "POST"})


class ServerContext:
    """What every connection of one process shares: the current configuration
    (swapped on reload), the queue and the checking stages."""

    def __init__(
        self,
        config: RelayConfig,
        queue: Queue,
        *,
        postscreen: Postscreen,
        dns_checks: DnsChecks,
        spf: SpfChecker,
        tls_context: ssl.SSLContext | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        on_queued: Callable[[str], None] | None = None,
        anvil: Anvil | None = None,
        min_data_rate: float = MIN_DATA_RATE,
        error_sleep: float = hygiene.ERROR_SLEEP,
    ) -> None:
        self.config = config
        self.queue = queue
        self.postscreen = postscreen
        self.dns_checks = dns_checks
        self.spf = spf
        self.tls_context = tls_context
        self.idle_timeout = idle_timeout
        self.min_data_rate = min_data_rate
        self.error_sleep = error_sleep  # smtpd_error_sleep_time
        self.on_queued = on_queued
        # Per-client rate limits (relay.smtpd.anvil), shared by the process's sessions.
        self.anvil = anvil if anvil is not None else Anvil()
        self.sessions: set[RelaySMTP] = set()
        self.shutting_down = False
        self._free_space_checked = 0.0
        self._free_space_ok = True
        self._trusted: dict[str, bool] = {}  # client ip -> in mynetworks, for this config

    def trusted(self, client_ip: str) -> bool:
        """in_mynetworks, remembered per address until the configuration changes."""
        known = self._trusted.get(client_ip)
        if known is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            known = self._trusted[client_ip] = in_mynetworks(self.config, client_ip)
        return known

    def update_config(self, config: RelayConfig) -> None:
        """New sessions and new commands see the new configuration at once."""
        self.config = config
        self._trusted = {}
        self.postscreen.update_config(config)
        self.dns_checks.update_config(config)
        self.spf.update_config(config)

    def storage_ok(self) -> bool:
        """Enough free space for a message of the maximum size (cached 1 s)."""
        now = time.monotonic()
        if now - self._free_space_checked > 1.0:
            self._free_space_checked = now
            try:
                st = os.statvfs(self.queue.directory)
                free = st.f_bavail * st.f_frsize
                self._free_space_ok = free >= FREE_SPACE_FACTOR * self.config.limits.message_size
            except OSError:
                self._free_space_ok = True  # cannot tell: the write will say
        return self._free_space_ok

    def begin_shutdown(self) -> None:
        """Stops new transactions; idle sessions are told so at once."""
        self.shutting_down = True
        for s in list(self.sessions):
            if s.idle:
                s.close_with(self._shutdown_reply())

    def close_all(self) -> None:
        """End of the grace period: whoever is still here is told to come back."""
        for s in list(self.sessions):
            s.close_with(self._shutdown_reply())

    def _shutdown_reply(self) -> Reply:
        return Reply(
            421, "4.3.2", f"{self.config.hostname} Service shutting down, closing connection"
        )


def client_name(session: Session) -> str:
    """Postfix's `name[ip]` for logs and Received headers."""
    return f"{session.reverse_name or 'unknown'}[{session.client_ip}]"


_date_cache: tuple[int, str] = (0, "")


def rfc5322_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.format_datetime(datetime.fromtimestamp(now, UTC)))
    return _date_cache[1]


def received_header(session: Session, hostname: str, queue_id: str, recipients: list[str]) -> bytes:
    proto = "ESMTPS" if session.tls else "ESMTP" if session.esmtp else "SMTP"
    helo = printable(session.helo or "unknown")
    reverse = printable(session.reverse_name or "unknown")
    for_part = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    return (
        f"Received: from {helo} ({reverse} [{session.client_ip}])\r\n"
        f"\tby {hostname} ({MAIL_NAME}) with {proto} id {queue_id}{for_part};"
        f" {rfc5322_date()}\r\n"
    ).encode("utf-8", "surrogateescape")


Command = Callable[["RelaySMTP", str], Awaitable[None]]


class RelaySMTP(SMTP):
    """One client connection."""

    COMMANDS: ClassVar[dict[str, Command]] = {}

    def __init__(self, ctx: ServerContext, *, via_proxy: bool = False) -> None:
        # Deliberately not SMTP.__init__ (see the module docstring): set up the
        # stream protocol and the attributes aiosmtpd's plumbing uses.
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=READ_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.loop = loop
        self.ctx = ctx
        self.config = ctx.config  # refreshed at each MAIL
        self.hostname = self.config.hostname
        self.event_handler = None
        self._handle_hooks: dict[str, Any] = {}
        self.enable_SMTPUTF8 = True
        self.tls_context = ctx.tls_context
        self._timeout_duration = ctx.idle_timeout
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport: Any = None
        self._handler_coroutine = None
        self.state = Session(client_ip="")
        self.txn: Transaction | None = None
        self.idle = False  # waiting for a command, outside a transaction
        self._closing = False
        # On the proxy listener: a PROXY header comes first (relay.smtpd.proxy).
        self.via_proxy = via_proxy
        self._anvil_ip: str | None = None  # counted by ctx.anvil until connection_lost
        self._held: list[bytes] = []  # replies waiting for the end of a pipelined group

    # -- plumbing ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.state = Session(
            client_ip=str(peer[0]),
            client_port=int(peer[1]),
            peer_ip=str(peer[0]),
            local_ip=str(sock[0]),
            local_port=int(sock[1]),
        )
        self.state.trusted = self.ctx.trusted(self.state.client_ip)
        self.ctx.sessions.add(self)
        # Reads of at most the StreamReader's window: asyncio's default (256 KB)
        # makes every recv() allocate (mmap) and shrink a buffer that big.
        if hasattr(transport, "max_size"):
            transport.max_size = READ_LIMIT
        # aiosmtpd's connection_made builds its own session object and logs;
        # none of that is used here: only the stream plumbing is.
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport
        self._reset_timeout()
        self._handler_coroutine = self.loop.create_task(self._handle_client())

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.discard(self)
        if self._anvil_ip is not None:
            self.ctx.anvil.disconnect(self._anvil_ip)
            self._anvil_ip = None
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        self.transport = None

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Pushes the idle deadline back. Called for every command and DATA
        chunk, so it only moves a number: the one timer of the session sees
        the new deadline when it fires and sleeps again."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timeout_handle = None
        if self.transport is None:
            return
        if self.loop.time() >= self._deadline:
            self._timeout_cb()
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def eof_received(self) -> bool | None:
        """The client hung up (or half-closed). aiosmtpd's version cancels the
        command loop and keeps the socket open, which nobody then closes: the
        session, its file descriptor and its anvil count would stay until the
        idle timeout. Here the loop reads what was sent before the EOF, sees
        the end and closes the connection itself."""
        self._reader.feed_eof()
        # An SSL transport cannot stay half-open: let it close.
        return not self._over_ssl

    def _timeout_cb(self) -> None:
        log.info("timeout after %s from %s", self._last_command, client_name(self.state))
        self.close_with(Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))

    def close_with(self, reply: Reply) -> None:
        """Sends a last reply and closes (from callbacks: no waiting)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.write(self._take_held() + f"{reply}\r\n".encode())
        self.transport.close()

    # Replies are written at once, except to a command that may sit inside a
    # pipelined group (RFC 2920) while the client's next command is already
    # here: those wait and go out with the next reply, one write for the
    # group, as Postfix flushes only when it has no more input to read.
    def _holdable(self) -> bool:
        return self._last_command in GROUP_MEMBERS and b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    def _take_held(self) -> bytes:
        if not self._held:
            return b""
        held = b"".join(self._held)
        self._held.clear()
        return held

    async def _write(self, data: bytes, *, hold: bool = False) -> None:
        if data and self.state.errors >= hygiene.SOFT_ERROR_LIMIT and self.ctx.error_sleep:
            await asyncio.sleep(self.ctx.error_sleep)  # Postfix smtpd_error_sleep_time
        if hold and self._holdable():
            self._held.append(data)
            return
        if self._held:
            data = self._take_held() + data
        self._writer.write(data)
        if self._paused or self.transport is None or self.transport.is_closing():  # type: ignore[attr-defined]
            await self._writer.drain()  # the client is not reading: wait for it

    async def send(self, reply: Reply) -> None:
        if reply.code >= 400:
            self.state.errors += 1
        data = f"{reply}\r\n".encode("utf-8", "surrogateescape")
        await self._write(data, hold=not reply.disconnect)
        if reply.disconnect:
            await self._writer.drain()
            self.close_with_nothing()

    async def send_lines(self, lines: list[str]) -> None:
        await self._write("".join(line + "\r\n" for line in lines).encode())

    def _internal_error(self) -> None:
        """A bug must not leave the client waiting for a reply until the idle
        timeout: tell it to come back, and close."""
        metrics.REJECTED.labels("internal_error").inc()
        self.close_with(Reply(421, "4.3.0", f"{self.hostname} Error: internal error"))

    def close_with_nothing(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def reply(self, code: int, status: str, text: str, *, disconnect: bool = False) -> None:
        if disconnect:
            await self.send(Reply(code, status, text, disconnect=True))
            return
        # The common path, without a Reply object: same line as str(Reply).
        if code >= 400:
            self.state.errors += 1
        line = f"{code} {status} {text}\r\n" if status else f"{code} {text}\r\n"
        await self._write(line.encode("utf-8", "surrogateescape"), hold=True)

    # -- the command loop ----------------------------------------------------

    _last_command = "CONNECT"

    async def _handle_client(self) -> None:
        try:
            await self._session()
        except Exception:
            # A session never dies silently: logged once, and the client told.
            log.exception(
                "internal error after %s from %s", self._last_command, client_name(self.state)
            )
            self._internal_error()

    async def _session(self) -> None:
        s = self.state
        if self.via_proxy:
            # The real client's IP replaces the load balancer's before anything
            # (mynetworks, anvil, postscreen, logs) looks at it.
            if not await accept_proxy(s, self._reader, self.config.proxy_protocol):
                self.close_with_nothing()
                return
            s.trusted = in_mynetworks(self.config, s.client_ip)
        metrics.CONNECTIONS.inc()
        log.debug("connect from %s", client_name(s))  # decisions only at INFO
        refused = self.ctx.anvil.connect(s, self.config.limits, self.hostname)
        if not s.trusted:
            self._anvil_ip = s.client_ip
        if refused is not None:
            await self.send(refused)
            return
        try:
            s.screen = await self.ctx.postscreen.screen(s, self._reader, self._writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_with_nothing()
            return
        except Exception:
            log.exception("postscreen failed for %s; letting the client in", client_name(s))
            s.screen = ScreenResult()
        if s.screen.action == "drop":
            reply = s.screen.reply
            if reply is None:  # e.g. the client hung up during the screen
                self.close_with_nothing()
                return
            log.info("DISCONNECT %s: %s", client_name(s), reply)
            await self.send(Reply(reply.code, reply.status, reply.text, disconnect=True))
            return
        await self.send_lines([f"220 {self.hostname} ESMTP {MAIL_NAME}"])
        try:
            while self.transport is not None and not self._closing:
                if s.errors >= self.config.limits.errors_per_session:
                    log.info("too many errors after %s from %s", self._last_command, client_name(s))
                    await self.reply(
                        421, "4.7.0", f"{self.hostname} Error: too many errors", disconnect=True
                    )
                    return
                if self.ctx.shutting_down and self.txn is None:
                    self.close_with(self.ctx._shutdown_reply())
                    return
                line = await self._read_command()
                if line is None:
                    continue
                await self._dispatch(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close_with_nothing()
        finally:
            log.debug("disconnect from %s", client_name(s))

    async def _read_command(self) -> bytes | None:
        self.idle = self.txn is None
        if self._held and b"\n" not in self._reader._buffer:  # type: ignore[attr-defined]
            await self._write(b"")  # never wait for input with replies unsent
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            # Longer than anything we keep: skip to the end of the line.
            await self._reader.readexactly(e.consumed)
            while True:
                try:
                    await self._reader.readuntil(b"\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.readexactly(more.consumed)
            await self.reply(500, "5.5.2", "Error: line too long")
            return None
        finally:
            self.idle = False
        if len(line) > COMMAND_LINE_LIMIT:
            await self.reply(500, "5.5.2", "Error: line too long")
            return None
        return line

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
        handler = self.COMMANDS.get(command)
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
        self._reset_timeout()
        await handler(self, arg)

    def _note_pipelining(self, command: str) -> None:
        """Postfix's improper-pipelining flag: input waiting after a command
        that must wait for its reply (or any command, without EHLO)."""
        if self.state.unauth_pipelining or command == "QUIT":
            return
        if (command in LAST_IN_GROUP or not self.state.esmtp) and len(
            self._reader._buffer  # type: ignore[attr-defined]
        ):
            self.state.unauth_pipelining = True
            log.info(
                "improper command pipelining after %s from %s", command, client_name(self.state)
            )

    # -- commands ------------------------------------------------------------

    async def smtp_HELO(self, arg: str) -> None:
        if not arg:
            await self.reply(501, "5.5.4", "Syntax: HELO hostname")
            return
        # As Postfix's helo_cmd: the name is kept printable (it goes into
        # Received:, Received-SPF: and log lines).
        self.state.helo = printable(arg)
        self.state.esmtp = False
        self.txn = None
        await self.reply(250, "", self.hostname)

    async def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            await self.reply(501, "5.5.4", "Syntax: EHLO hostname")
            return
        self.state.helo = printable(arg)
        self.state.esmtp = True
        self.txn = None
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.config.limits.message_size}",
        ]
        if self.ctx.tls_context is not None and not self.state.tls:
            lines.append("STARTTLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME"]
        await self.send_lines([f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"])

    async def _need_helo(self) -> bool:
        if self.state.helo is None:
            await self.reply(503, "5.5.1", "Error: send HELO/EHLO first")
            return True
        return False

    async def smtp_MAIL(self, arg: str) -> None:
        if await self._need_helo():
            return
        if self.txn is not None:
            await self.reply(503, "5.5.1", "Error: nested MAIL command")
            return
        if self.ctx.shutting_down:
            await self.send(self.ctx._shutdown_reply())
            self.close_with_nothing()
            return
        # Each transaction sees the configuration current when it starts.
        self.config = self.ctx.config
        refused = self.ctx.anvil.message(self.state, self.config.limits)
        if refused is not None:
            await self.send(refused)
            return
        if arg[:5].upper() != "FROM:":
            await self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        try:
            sender, param_text = parse_path(arg[5:])
        except AddressError:
            await self.reply(501, "5.1.7", "Bad sender address syntax")
            return
        params = parse_esmtp_params(param_text)
        if params is None or (params and not self.state.esmtp):
            await self.reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
            return
        size: int | None = None
        for key, value in params.items():
            if key == "SIZE":
                size = hygiene.ascii_number(value)
                if size is None:
                    await self.reply(501, "5.5.4", "Bad message size syntax")
                    return
                if size > self.config.limits.message_size:
                    metrics.REJECTED.labels("message_size").inc()
                    await self.reply(552, "5.3.4", "Message size exceeds fixed limit")
                    return
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    await self.reply(501, "5.5.4", "Unsupported BODY parameter")
                    return
            elif key == "AUTH":
                pass  # no AUTH here; RFC 4954 says to ignore it then
            else:
                await self.reply(555, "5.5.4", f"Unsupported option: {printable(key)}")
                return
        if not self.ctx.storage_ok():
            log.warning(
                "NOQUEUE: reject: MAIL from %s: insufficient queue space", client_name(self.state)
            )
            metrics.REJECTED.labels("storage").inc()
            await self.reply(452, "4.3.1", "Insufficient system storage")
            return
        self.txn = Transaction(
            Envelope(sender=sender.text, mail_options=param_text.split(), size_hint=size)
        )
        await self.reply(250, "2.1.0", "Ok")

    async def smtp_RCPT(self, arg: str) -> None:
        if await self._need_helo():
            return
        txn = self.txn
        if txn is None:
            await self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if arg[:3].upper() != "TO:":
            await self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        refused = self.ctx.anvil.recipient(self.state, self.config.limits)
        if refused is not None:
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
        params = parse_esmtp_params(param_text)
        if params is None or (params and not self.state.esmtp):
            await self.reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
            return
        if params:
            await self.reply(555, "5.5.4", f"Unsupported option: {printable(next(iter(params)))}")
            return
        envelope = txn.envelope
        # Postfix smtpd_recipient_limit counts every accepted RCPT, repeats too.
        if envelope.rcpt_count >= self.config.limits.recipients_per_message:
            metrics.REJECTED.labels("too_many_recipients").inc()
            await self.reply(452, "4.5.3", "Error: too many recipients")
            return
        check = Check(
            config=self.config,
            session=self.state,
            transaction=txn,
            rcpt=rcpt,
            dns=self.ctx.dns_checks,
            spf=self.ctx.spf,
        )
        try:
            verdict = await check_recipient(check)
        except Exception:
            log.exception("restriction failed for %s", client_name(self.state))
            check.reasons.append("policy_error")
            verdict = Reply(451, "4.3.5", "Server configuration problem")
        if verdict is not None:
            reason = check.reasons[-1] if check.reasons else "policy"
            metrics.REJECTED.labels(reason).inc()
            log.info(
                "NOQUEUE: reject: RCPT from %s: %s; from=<%s> to=<%s> proto=%s helo=<%s>",
                client_name(self.state),
                verdict,
                envelope.sender,
                rcpt.original,
                "ESMTP" if self.state.esmtp else "SMTP",
                printable(self.state.helo or ""),
            )
            await self.send(verdict)
            return
        envelope.rcpt_count += 1
        if rcpt.text not in envelope.recipients:
            envelope.recipients.append(rcpt.text)
        await self.reply(250, "2.1.5", "Ok")

    async def smtp_DATA(self, arg: str) -> None:
        if await self._need_helo():
            return
        txn = self.txn
        if txn is None:
            await self.reply(503, "5.5.1", "Error: need MAIL command")
            return
        if self.state.screen.action == "enforce":
            # postscreen enforce: the client never gets to send a message.
            await self.reply(554, "5.5.1", "Error: no valid recipients", disconnect=True)
            return
        if not txn.envelope.recipients:
            await self.reply(554, "5.5.1", "Error: no valid recipients")
            return
        if arg:
            await self.reply(501, "5.5.4", "Syntax: DATA")
            return
        if self.state.unauth_pipelining and self.config.restrictions.reject_unauth_pipelining:
            # Postfix smtpd_data_restrictions=reject_unauth_pipelining.
            metrics.REJECTED.labels("unauth_pipelining").inc()
            await self.reply(
                503,
                "5.5.0",
                "<DATA>: Data command rejected: Improper use of SMTP command pipelining",
            )
            return
        try:
            incoming = self.ctx.queue.incoming()
        except Exception:
            log.exception("cannot create a queue file")
            await self.reply(451, "4.3.0", "Error: queue file write error")
            return
        try:
            await self._receive_data(txn, incoming)
        except Exception as e:
            incoming.abort()
            if isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
                raise
            log.exception(
                "%s: internal error in DATA from %s", incoming.queue_id, client_name(self.state)
            )
            self._internal_error()
        except BaseException:
            incoming.abort()
            raise
        finally:
            self.txn = None

    async def _receive_data(self, txn: Transaction, incoming: Any) -> None:
        envelope = txn.envelope
        s = self.state
        limit = self.config.limits.message_size
        await self.reply(354, "", "End data with <CR><LF>.<CR><LF>")
        write_failed: Exception | None = None
        # The attachment filter reads the message as it arrives: no second read.
        check = content.content_check(self.config)
        head = received_header(s, self.hostname, incoming.queue_id, envelope.recipients)
        if envelope.prepend_headers:
            head += b"".join(
                hygiene.header_safe(h).encode() + b"\r\n" for h in envelope.prepend_headers
            )
        try:
            incoming.write(head)
        except Exception as e:
            write_failed = e
        if check is not None:
            check.feed_inline(head)
        decoder = DataDecoder()
        too_big = False
        flushed = 0
        data_started = self.loop.time()
        while not decoder.done:
            data = await self._reader.read(DATA_CHUNK)
            if not data:
                incoming.abort()
                self.close_with_nothing()
                return
            chunk = decoder.feed(data)
            # The DATA deadline: the idle timeout, plus time earned by bytes
            # received at smtpd_min_data_rate (never more than an idle timeout ahead).
            earned = data_started + self._timeout_duration + decoder.size / self.ctx.min_data_rate
            self._reset_timeout(max(0.001, min(self._timeout_duration, earned - self.loop.time())))
            if decoder.size > limit:
                too_big = True
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
        if decoder.rest:
            # Commands pipelined after the final dot belong to the command reader.
            self._reader._buffer[0:0] = decoder.rest  # type: ignore[attr-defined]
        if too_big:
            incoming.abort()
            metrics.REJECTED.labels("message_size").inc()
            log.info(
                "NOQUEUE: reject: END-OF-MESSAGE from %s: message too big (%d bytes)",
                client_name(s),
                decoder.size,
            )
            await self.reply(552, "5.3.4", "Error: message file too big")
            return
        if write_failed is not None:
            incoming.abort()
            await self._queue_error(write_failed)
            return
        verdict = check.verdict() if check is not None else None
        if verdict is not None:
            incoming.abort()
            metrics.REJECTED.labels("content").inc()
            log.info(
                "%s: reject: END-OF-MESSAGE from %s: %s; from=<%s> to=<%s>",
                incoming.queue_id,
                client_name(s),
                verdict,
                envelope.sender,
                ",".join(envelope.recipients),
            )
            await self.send(verdict)
            return
        try:
            queue_id = await incoming.commit(
                envelope.sender, envelope.recipients, client=s.client_ip
            )
        except Exception as e:
            await self._queue_error(e)
            return
        s.messages += 1
        s.errors = 0  # Postfix counts errors "without delivering mail"
        s.junk_commands = 0  # and "the junk command count is reset after mail is delivered"
        metrics.ACCEPTED.inc()
        metrics.ACCEPTED_BYTES.inc(decoder.size)
        logbuffer.info(
            log,
            "%s: client=%s, from=<%s>, to=<%s>, size=%d, nrcpt=%d (queue active)",
            queue_id,
            client_name(s),
            envelope.sender,
            ">,<".join(envelope.recipients),
            decoder.size,
            len(envelope.recipients),
        )
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
        metrics.REJECTED.labels("queue_error").inc()
        await self.reply(451, "4.3.0", "Error: queue file write error")

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.reply(501, "5.5.4", "Syntax: RSET")
            return
        self.txn = None
        await self.reply(250, "2.0.0", "Ok")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.reply(250, "2.0.0", "Ok")

    async def smtp_QUIT(self, arg: str) -> None:
        await self.reply(221, "2.0.0", "Bye", disconnect=True)

    async def smtp_VRFY(self, arg: str) -> None:
        await self.reply(502, "5.5.1", "VRFY command is disabled")

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
        self._reader._buffer.clear()  # type: ignore[attr-defined]
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
        self.transport = new_transport
        self._transport = new_transport
        self._over_ssl = True
        self._writer._transport = new_transport  # type: ignore[attr-defined]
        self._reader._transport = new_transport  # type: ignore[attr-defined]
        # RFC 3207: forget everything learned before TLS.
        self.state.tls = True
        self.state.helo = None
        self.state.esmtp = False
        self.txn = None


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
