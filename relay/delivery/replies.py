"""The replies of one delivery transaction, read off the connection in order.

aiosmtplib reads exactly one reply per command it sent and drops replies it
does not expect, so it cannot read a pipelined group (RFC 2920), nor the
reply to a final dot written before it waits for one. For the length of a
transaction (relay.delivery.transaction) the connection's transport is
handed to ReplyReader (its own protocol), then given back to aiosmtplib,
which does everything else (connect, EHLO, STARTTLS, RSET, QUIT). A
connection lost meanwhile is passed on to aiosmtplib's protocol, so the
pool sees it as closed; one left out of step with the peer is closed.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol, cast

from aiosmtplib import SMTP, SMTPResponse, SMTPServerDisconnected

MAX_REPLY_LINE = 8192  # RFC 5321's 512, with room for chatty servers
MAX_REPLY_BYTES = 64 * 1024


class StreamTransport(Protocol):
    """What a transaction needs of the connection's transport: asyncio's stream
    transports and uvloop's (which do not subclass asyncio.WriteTransport) have it."""

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None: ...


class ReplyError(Exception):
    """A reply that is not SMTP (bad code, too long)."""


class ReplyReader(asyncio.Protocol):
    """Parses the SMTP replies arriving on a transport into a queue."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[str] = []  # lines of a multi-line reply so far
        self.replies: collections.deque[SMTPResponse] = collections.deque()
        self.error: BaseException | None = None
        self.lost = False
        self.lost_with: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._expired = False  # next_reply's time is up
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self.transport: StreamTransport | None = None

    # -- protocol callbacks ------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except ReplyError as e:
            self.error = e
        self._wake()

    def _parse(self) -> None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    raise ReplyError("reply line too long")
                return
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if len(line) > MAX_REPLY_LINE:
                raise ReplyError("reply line too long")
            code = line[:3]
            if not code.isdigit():
                raise ReplyError(f"malformed reply: {line[:80]!r}")
            self._lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            if sum(len(x) for x in self._lines) > MAX_REPLY_BYTES:
                raise ReplyError("reply too long")
            if line[3:4] != b"-":
                self.replies.append(SMTPResponse(int(code), "\n".join(self._lines)))
                self._lines = []

    def eof_received(self) -> bool:
        self._disconnected(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnected(exc)

    def _disconnected(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_with = self.lost_with or exc
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the transaction -----------------------------------------------

    def write(self, data: bytes) -> None:
        if self.lost or self.transport is None or self.transport.is_closing():
            raise SMTPServerDisconnected("Connection lost") from self.lost_with
        self.transport.write(data)

    async def next_reply(self, timeout: float) -> SMTPResponse:
        """The next reply within `timeout` seconds; raises TimeoutError,
        SMTPServerDisconnected or ReplyError. One already read (the rest of a
        pipelined group arrives with its first reply) is taken at once; else
        one timer fails the waiter (cheaper than asyncio.timeout's task
        cancellation, twice per delivered message)."""
        if self.replies:
            return self.replies.popleft()
        loop = asyncio.get_running_loop()
        self._expired = False
        timer = loop.call_later(timeout, self._time_out)
        try:
            while not self.replies:
                if self.error is not None:
                    raise self.error
                if self.lost:
                    raise SMTPServerDisconnected("Connection lost") from self.lost_with
                if self._expired:  # (between two waits: part of a reply came in)
                    raise TimeoutError("no reply in time")
                self._waiter = loop.create_future()
                await self._waiter
        finally:
            timer.cancel()
        return self.replies.popleft()

    def _time_out(self) -> None:
        self._expired = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(TimeoutError("no reply in time"))

    async def drain(self) -> None:
        """Waits while the peer does not read what was written."""
        while self._paused and not self.lost:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self.lost:
            raise SMTPServerDisconnected("Connection lost") from self.lost_with


class Borrowed:
    """`async with Borrowed(smtp) as reader:` the transport reads into a
    ReplyReader; aiosmtplib gets it back afterwards (or learns it is lost)."""

    def __init__(self, smtp: SMTP) -> None:
        self.smtp = smtp
        self.reader = ReplyReader()
        self.protocol: asyncio.BaseProtocol | None = None  # aiosmtplib's, while borrowed

    async def __aenter__(self) -> ReplyReader:
        self.protocol, transport = self.smtp.protocol, self.smtp.transport
        if self.protocol is None or transport is None or transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        # aiosmtplib types it as a BaseTransport; what it connects is a TCP
        # stream, TLS or not, on asyncio or uvloop: it writes.
        stream = cast(StreamTransport, transport)
        stream.set_protocol(self.reader)
        self.reader.transport = stream
        return self.reader

    async def __aexit__(self, *exc: object) -> None:
        reader = self.reader
        protocol, transport = self.protocol, reader.transport
        assert protocol is not None and transport is not None
        if reader.lost or transport.is_closing():
            transport.close()
            # aiosmtplib forgets the transport and wakes nobody (no command pending).
            protocol.connection_lost(reader.lost_with)
            return
        transport.set_protocol(protocol)
        if reader.replies or reader._buffer or reader._lines or reader.error is not None:
            # Out of step with the peer (unexpected replies): never reuse.
            transport.close()
