"""One client connection, below the SMTP protocol: the stream's callbacks,
the idle timer, the replies that go out, and closing.

The idle timer is Postfix's smtpd_timeout: one timer per session, pushed
back by every command and DATA chunk (relay.smtpd.server runs the commands,
relay.smtpd.transaction the DATA stream).

Replies are written at once, except to a command that may sit inside a
pipelined group (RFC 2920) while the client's next command is already
here: those wait and go out with the next reply, one write for the group,
as Postfix flushes only when it has no more input to read. Every reply of
4xx or 5xx counts as an error of the session (smtpd_hard_error_limit).
"""

from __future__ import annotations

import asyncio
import logging

from relay import metrics
from relay.smtpd import hygiene
from relay.smtpd.aiosmtpd_adapter import StreamProtocol
from relay.smtpd.context import ServerContext
from relay.smtpd.session import Reply, Session, client_name

log = logging.getLogger("mailrelay.smtpd")

READ_LIMIT = 64 * 1024  # the longest line read, and the input's flow-control window

# Commands that may stand anywhere in a pipelined group (RFC 2920): their
# replies may wait for the group's last one.
GROUP_MEMBERS = frozenset({"MAIL", "RCPT", "RSET"})


class SmtpConnection(StreamProtocol):
    """One client connection; the subclass speaks SMTP on it (`serve`)."""

    _last_command = "CONNECT"  # the command being answered, for batching and logs

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(READ_LIMIT)
        self.ctx = ctx
        self.config = ctx.config  # refreshed at each MAIL
        self.hostname = self.config.hostname
        self.idle_timeout = ctx.idle_timeout
        self.state = Session(client_ip="")  # filled in by connection_made
        self.idle = False  # waiting for a command, outside a transaction
        self._closing = False
        self._held: list[bytes] = []  # replies waiting for the end of a pipelined group
        self._deadline = 0.0
        self._timeout_handle: asyncio.TimerHandle | None = None
        self._serving: asyncio.Task[None] | None = None
        self._anvil_ip: str | None = None  # counted by ctx.anvil until connection_lost

    async def serve(self) -> None:
        """The SMTP session, from the greeting on."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = transport.get_extra_info("sockname") or ("", 0)
        s = self.state
        s.client_ip = s.peer_ip = str(peer[0])
        s.client_port = int(peer[1])
        s.local_ip, s.local_port = str(sock[0]), int(sock[1])
        s.trusted = self.ctx.trusted(s.client_ip)
        self.ctx.sessions.add(self)
        # Reads of at most the input's window: asyncio's default (256 KB)
        # makes every recv() allocate (mmap) and shrink a buffer that big.
        if hasattr(transport, "max_size"):
            transport.max_size = READ_LIMIT
        super().connection_made(transport)
        self.reset_timeout()
        self._serving = self.loop.create_task(self.serve())

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.discard(self)
        if self._anvil_ip is not None:
            self.ctx.anvil.disconnect(self._anvil_ip)
            self._anvil_ip = None
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
            self._timeout_handle = None
        super().connection_lost(error)
        if self._serving is not None:
            self._serving.cancel()

    def reset_timeout(self, duration: float | None = None) -> None:
        """Pushes the idle deadline back. Called for every command and DATA
        chunk, so it only moves a number: the one timer of the session sees
        the new deadline when it fires and sleeps again."""
        self._deadline = self.loop.time() + (duration or self.idle_timeout)
        if self._timeout_handle is None:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timeout_handle = None
        if self.transport is None:
            return
        if self.loop.time() >= self._deadline:
            self._idle_timeout_expired()
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _idle_timeout_expired(self) -> None:
        log.info("timeout after %s from %s", self._last_command, client_name(self.state))
        self.close_with(Reply(421, "4.4.2", f"{self.hostname} Error: timeout exceeded"))

    def close_with(self, reply: Reply) -> None:
        """Sends a last reply and closes (from callbacks: no waiting)."""
        if self._closing or self.transport is None:
            return
        self._closing = True
        self.transport.write(self._take_held() + f"{reply}\r\n".encode())
        self.transport.close()

    def internal_error(self) -> None:
        """A bug must not leave the client waiting for a reply until the idle
        timeout: tell it to come back, and close."""
        metrics.child(metrics.REJECTED, "internal_error").inc()
        self.close_with(Reply(421, "4.3.0", f"{self.hostname} Error: internal error"))

    def close_with_nothing(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    async def send(self, reply: Reply) -> None:
        if reply.code >= 400:
            self.state.errors += 1
        data = f"{reply}\r\n".encode("utf-8", "surrogateescape")
        await self._write(data, hold=not reply.disconnect)
        if reply.disconnect:
            self.close_with_nothing()  # close() still sends what _write left buffered

    async def reply(self, code: int, status: str, text: str, *, disconnect: bool = False) -> None:
        """send(Reply(code, status, text, disconnect=...)) without the object."""
        if code >= 400:
            self.state.errors += 1
        line = f"{code} {status} {text}\r\n" if status else f"{code} {text}\r\n"
        await self._write(line.encode("utf-8", "surrogateescape"), hold=not disconnect)
        if disconnect:
            self.close_with_nothing()

    def _holdable(self) -> bool:
        return self._last_command in GROUP_MEMBERS and b"\n" in self.pending_input

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
        self.write(data)
        if self.output_paused or self.transport is None or self.transport.is_closing():
            await self.drain()  # the client is not reading: wait for it
