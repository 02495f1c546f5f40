"""The one module that touches aiosmtpd's and asyncio's protocol machinery.

aiosmtpd's SMTP class is the protocol the server builds on: an
asyncio.StreamReaderProtocol whose `_cb_client_connected` wires up a stream
reader and writer per connection. Its public surface (SMTP.__init__, the
handler hooks, its command loop) does not serve a port-25 MX on the hot path:
__init__ walks the class and the handler with inspect.getmembers on every
connection (~0.5 ms) to build an AUTH table this relay never offers, and its
loop speaks aiosmtpd's replies, not Postfix's (enhanced status codes, error
counting, pipelining detection). So relay.smtpd.server runs its own command
loop, and StreamProtocol keeps SMTP as its base class for what the project
names as its stack, but runs none of its or asyncio's stream machinery:
neither SMTP.__init__ nor StreamReaderProtocol.__init__ is called, and every
protocol callback either class defines is overridden here (the adapter's test
checks that list against both libraries).

Why not asyncio's StreamReader and StreamWriter: with a new connection per
message (an MX's usual load), their cost per connection was a good part of the
receiving side's CPU: a StreamReader, a StreamWriter, a close-waiter future,
and a coroutine plus a future for every command read, although the command is
nearly always in the buffer already. Here the connection's input is one
bytearray that data_received appends to: a command line already buffered is
taken without any await, and a future is created only when the session has to
wait for input. Replies go straight to the transport; the session waits for
the client only when the transport paused writing (asyncio's flow-control
callbacks, which are public).

What the session reads off the pending input (it is public here, `pending_input`):
is a pipelined command waiting (RFC 2920 reply batching, Postfix's improper
pipelining flag), what a client sent after the final dot (`push_back`),
dropping plaintext input at STARTTLS (CVE-2011-0411), postscreen's peek
(`wait_readable`). Flow control as asyncio's StreamReader: reading pauses
while more than twice the read limit is buffered and resumes at the limit.

Tested with aiosmtpd TESTED_AIOSMTPD, the range pinned in pyproject.toml;
tests/relay/test_aiosmtpd_adapter.py fails when aiosmtpd or asyncio adds a
callback this class does not override, and covers the input's edge cases.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

# The aiosmtpd versions this adapter was tested with: pyproject.toml pins the same.
TESTED_AIOSMTPD = ">=1.4.6,<1.5"


class StreamProtocol(SMTP):
    """aiosmtpd's SMTP protocol class, with the connection's input and output
    run on the protocol itself.

    Reads follow asyncio.StreamReader's contract (readuntil, readexactly,
    read; IncompleteReadError at EOF, LimitOverrunError past the limit), so
    code written for a StreamReader (relay.smtpd.proxy) reads from it as well.
    """

    transport: asyncio.Transport | None = None
    # The transport's write buffer is over its high-water mark: drain() waits.
    output_paused = False
    over_tls = False
    _eof = False  # the client sent EOF, or the connection is gone
    _input_error: Exception | None = None  # why the connection was lost
    _reading_paused = False
    _input_waiter: asyncio.Future[None] | None = None
    _drain_waiter: asyncio.Future[None] | None = None

    def __init__(self, read_limit: int) -> None:
        # Neither SMTP.__init__ nor StreamReaderProtocol.__init__ (module docstring).
        self.loop = asyncio.get_running_loop()
        self.read_limit = read_limit
        # What the client sent that no read has consumed yet.
        self.pending_input = bytearray()

    # -- the transport's callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, error: Exception | None) -> None:
        self.transport = None
        self._eof = True
        if error is not None:
            self._input_error = error
        self._wake_input()
        self.resume_writing()  # drain() sees the transport gone

    def data_received(self, data: bytes) -> None:
        self.pending_input += data
        self._wake_input()
        if not self._reading_paused and len(self.pending_input) > 2 * self.read_limit:
            transport = self.transport
            if transport is not None:
                try:
                    transport.pause_reading()
                except NotImplementedError:
                    return
                self._reading_paused = True

    def eof_received(self) -> bool | None:
        """The client hung up (or half-closed). aiosmtpd's version cancels its
        command loop and keeps the socket open, which nobody then closes: here
        the session reads what was sent before the EOF, sees the end and
        closes the connection itself."""
        self._eof = True
        self._wake_input()
        # An SSL transport cannot stay half-open: let it close.
        return not self.over_tls

    def pause_writing(self) -> None:
        self.output_paused = True

    def resume_writing(self) -> None:
        self.output_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- output ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionResetError("Connection lost")
        self.transport.write(data)

    async def drain(self) -> None:
        """Waits while the transport's write buffer is over its high-water mark."""
        transport = self.transport
        if transport is None:
            raise ConnectionResetError("Connection lost")
        if transport.is_closing():
            # As StreamWriter.drain: let connection_lost run if it is due.
            await asyncio.sleep(0)
            if self.transport is None:
                raise ConnectionResetError("Connection lost")
            return
        if not self.output_paused:
            return
        if self._drain_waiter is None:
            self._drain_waiter = self.loop.create_future()
        # Shielded: a cancelled wait must not cancel the future another one shares.
        await asyncio.shield(self._drain_waiter)
        if self.transport is None:
            raise ConnectionResetError("Connection lost")

    # -- input -------------------------------------------------------------------

    def _wake_input(self) -> None:
        waiter = self._input_waiter
        if waiter is not None:
            self._input_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _consumed(self) -> None:
        if self._reading_paused and len(self.pending_input) <= self.read_limit:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    async def _wait_for_input(self) -> None:
        """Until more input, EOF or the connection's end."""
        if self._input_error is not None:
            raise self._input_error
        if self._eof:
            return
        if self._reading_paused:  # nothing consumable buffered: read more
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        waiter = self._input_waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._input_waiter = None
        if self._input_error is not None:
            raise self._input_error

    def at_eof(self) -> bool:
        return self._eof and not self.pending_input

    def take_line(self) -> bytes | None:
        """A line (up to and with its LF) already buffered and within the read
        limit, without waiting; None otherwise (then readuntil decides)."""
        buf = self.pending_input
        end = buf.find(b"\n", 0, self.read_limit + 1)
        if end < 0:
            return None
        line = bytes(buf[: end + 1])
        del buf[: end + 1]
        if self._reading_paused:
            self._consumed()
        return line

    def take(self, n: int) -> bytes:
        """Up to n bytes already buffered, without waiting (b"" if none)."""
        buf = self.pending_input
        if not buf:
            return b""
        if len(buf) <= n:
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        if self._reading_paused:
            self._consumed()
        return data

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at EOF (as StreamReader.read)."""
        while not self.pending_input and not self._eof:
            await self._wait_for_input()
        if not self.pending_input and self._input_error is not None:
            raise self._input_error
        return self.take(n)

    async def readexactly(self, n: int) -> bytes:
        buf = self.pending_input
        while len(buf) < n:
            if self._eof:
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            await self._wait_for_input()
        return self.take(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """As StreamReader.readuntil: LimitOverrunError (nothing consumed)
        when no separator comes within the read limit."""
        buf = self.pending_input
        limit = self.read_limit
        start = 0
        while True:
            found = buf.find(separator, start)
            if found >= 0:
                break
            start = max(0, len(buf) + 1 - len(separator))
            if start > limit:
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", start
                )
            if self._eof:
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, None)
            await self._wait_for_input()
        if found > limit:
            raise asyncio.LimitOverrunError(
                "Separator is found, but chunk is longer than limit", found
            )
        return self.take(found + len(separator))

    async def wait_readable(self) -> bytes:
        """Waits until the client sends something or hangs up; consumes
        nothing. Returns the bytes waiting (empty at EOF): postscreen's peek."""
        while not self.pending_input and not self._eof:
            await self._wait_for_input()
        return bytes(self.pending_input)

    def push_back(self, data: bytes) -> None:
        """Returns bytes read past a boundary to the front of the input."""
        self.pending_input[0:0] = data

    def use_tls_transport(self, transport: asyncio.Transport) -> None:
        """After loop.start_tls: reads and writes go through TLS from now on
        (start_tls resumed reading on the plaintext transport underneath)."""
        self.transport = transport
        self.over_tls = True
        self._reading_paused = False
