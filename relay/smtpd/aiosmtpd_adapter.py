"""The one module that touches aiosmtpd's and asyncio's private attributes.

aiosmtpd's SMTP class is the protocol the server builds on: an
asyncio.StreamReaderProtocol whose `_cb_client_connected` wires up the
stream reader and writer of each connection. Its public surface (SMTP.__init__,
the handler hooks, its command loop) does not serve a port-25 MX on the hot
path: __init__ walks the class and the handler with inspect.getmembers on
every connection (~0.5 ms) to build an AUTH table this relay never offers, and
its loop speaks aiosmtpd's replies, not Postfix's (enhanced status codes,
error counting, pipelining detection). So relay.smtpd.server runs its own
command loop on the stream aiosmtpd sets up, and that loop needs what neither
library offers publicly; every such access is here, nowhere else:
  - the bytes already read but not yet consumed (StreamReader._buffer): is a
    pipelined command waiting (RFC 2920 reply batching, Postfix's improper
    pipelining flag), giving back what a client sent after the final dot,
    dropping plaintext input at STARTTLS (CVE-2011-0411), postscreen's peek;
  - waiting for input without consuming it (StreamReader._wait_for_data),
    postscreen's MSG_PEEK;
  - after loop.start_tls, pointing the protocol, reader and writer at the TLS
    transport (_transport, _over_ssl), as aiosmtpd's own STARTTLS does.

Tested with aiosmtpd TESTED_AIOSMTPD, the range pinned in pyproject.toml;
tests/relay/test_aiosmtpd_adapter.py fails when aiosmtpd or asyncio moves any
of this underneath.
"""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP

# The aiosmtpd versions this adapter was tested with: pyproject.toml pins the same.
TESTED_AIOSMTPD = ">=1.4.6,<1.5"


class StreamProtocol(SMTP):
    """aiosmtpd's SMTP protocol, used only for its stream plumbing.

    SMTP.__init__ is deliberately not called (see the module docstring): the
    stream protocol is set up directly, and none of the attributes aiosmtpd's
    own command loop and hooks read exist, because none of them runs (the
    subclass overrides every protocol callback aiosmtpd defines).
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    # The reader's buffer itself (asyncio changes it in place): what the
    # client sent that no read has consumed yet.
    pending_input: bytearray

    def __init__(self, read_limit: int) -> None:
        loop = asyncio.get_running_loop()
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(limit=read_limit, loop=loop),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
        )
        self.loop = loop
        self.transport: asyncio.Transport | None = None

    def attach(self, transport: asyncio.BaseTransport) -> None:
        """StreamReaderProtocol's connection_made: aiosmtpd's callback then
        hands over the reader and writer."""
        asyncio.StreamReaderProtocol.connection_made(self, transport)
        self.transport = transport  # type: ignore[assignment]
        self.reader = self._reader
        self.writer = self._writer
        self.pending_input = self._reader._buffer  # type: ignore[attr-defined]

    def detach(self, error: Exception | None) -> None:
        asyncio.StreamReaderProtocol.connection_lost(self, error)
        self.transport = None

    # The transport's write buffer is over its high-water mark: drain() has
    # something to wait for. Kept by asyncio's own (public) flow-control callbacks.
    output_paused = False

    def pause_writing(self) -> None:
        self.output_paused = True
        super().pause_writing()

    def resume_writing(self) -> None:
        self.output_paused = False
        super().resume_writing()

    @property
    def over_tls(self) -> bool:
        return bool(self._over_ssl)

    def push_back(self, data: bytes) -> None:
        """Returns bytes read past a boundary to the front of the input."""
        self.pending_input[0:0] = data

    def use_tls_transport(self, transport: asyncio.Transport) -> None:
        """After loop.start_tls: reads and writes go through TLS from now on."""
        self.transport = transport
        self._transport = transport
        self._over_ssl = True
        self._writer._transport = transport  # type: ignore[attr-defined]
        self._reader._transport = transport  # type: ignore[attr-defined]


def peek(reader: asyncio.StreamReader) -> bytes:
    """The bytes waiting in `reader`, without consuming them."""
    return bytes(reader._buffer)  # type: ignore[attr-defined]


async def wait_readable(reader: asyncio.StreamReader) -> bytes:
    """Waits until the client sends something or hangs up; consumes nothing.

    Returns the bytes waiting (empty at EOF)."""
    while not reader._buffer and not reader.at_eof():  # type: ignore[attr-defined]
        await reader._wait_for_data("postscreen")  # type: ignore[attr-defined]
    return peek(reader)
