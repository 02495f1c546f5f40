"""What relay.smtpd.aiosmtpd_adapter relies on in aiosmtpd and asyncio (fails
loudly, naming the thing that moved, when either changes underneath), and the
edge cases of the connection's input it keeps on the protocol."""

from __future__ import annotations

import asyncio
import tomllib
from importlib import metadata
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.smtpd.aiosmtpd_adapter import TESTED_AIOSMTPD, StreamProtocol

ROOT = Path(__file__).resolve().parents[2]
# Transports and flow control on either loop the workers may run on.
pytestmark = pytest.mark.every_event_loop


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("."))


def test_aiosmtpd_is_in_the_tested_range_and_pyproject_pins_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"aiosmtpd{TESTED_AIOSMTPD}" in project["dependencies"]
    installed = _version(metadata.version("aiosmtpd"))
    assert installed == _version(aiosmtpd.__version__)
    for bound in TESTED_AIOSMTPD.split(","):
        if bound.startswith(">="):
            assert installed >= _version(bound[2:]), f"aiosmtpd {installed} older than tested"
        else:
            assert bound.startswith("<"), bound
            assert installed < _version(bound[1:]), (
                f"aiosmtpd {installed} is newer than the range the adapter was tested with"
                f" ({TESTED_AIOSMTPD}): check the adapter, then widen the pin"
            )


def test_smtp_is_still_an_asyncio_protocol_class() -> None:
    assert issubclass(SMTP, asyncio.StreamReaderProtocol)
    assert issubclass(StreamProtocol, SMTP)


# Every callback an asyncio transport may call on its protocol.
CALLBACKS = {
    name
    for base in (asyncio.BaseProtocol, asyncio.Protocol, asyncio.BufferedProtocol)
    for name in vars(base)
    if not name.startswith("_")
}


def test_every_protocol_callback_of_aiosmtpd_and_asyncio_is_overridden() -> None:
    """Neither SMTP.__init__ nor StreamReaderProtocol.__init__ runs: a callback
    of theirs would find none of its attributes, or start aiosmtpd's loop."""
    assert {"connection_made", "data_received", "eof_received", "pause_writing"} <= CALLBACKS
    for base in StreamProtocol.__mro__[1:]:
        if base in (asyncio.BaseProtocol, asyncio.Protocol, object):
            continue  # their callbacks do nothing
        for name in CALLBACKS & set(vars(base)):
            assert name in vars(StreamProtocol), f"{base.__name__}.{name} is not overridden"
    assert not issubclass(StreamProtocol, asyncio.BufferedProtocol)


class _Transport(asyncio.Transport):
    """What the protocol calls on its transport, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def pause_reading(self) -> None:
        assert not self.paused
        self.paused = True

    def resume_reading(self) -> None:
        assert self.paused
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing


def _protocol(limit: int = 64) -> tuple[StreamProtocol, _Transport]:
    protocol = StreamProtocol(limit)
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_buffered_line_is_taken_without_waiting() -> None:
    p, _ = _protocol()
    p.data_received(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDA")
    assert p.take_line() == b"MAIL FROM:<a@b>\r\n"
    assert p.take_line() == b"RCPT TO:<c@d>\r\n"
    assert p.take_line() is None and p.pending_input == b"DA"
    assert p._input_waiter is None  # no future for any of it


async def test_a_line_split_across_reads() -> None:
    p, _ = _protocol()
    p.data_received(b"EH")
    reading = asyncio.ensure_future(p.readuntil(b"\n"))
    await asyncio.sleep(0)
    assert not reading.done()
    p.data_received(b"LO a\r")
    await asyncio.sleep(0)
    assert not reading.done()
    p.data_received(b"\nQUIT\r\n")
    assert await reading == b"EHLO a\r\n"
    assert p.pending_input == b"QUIT\r\n"


async def test_eof_with_a_partial_line() -> None:
    p, _ = _protocol()
    p.data_received(b"QUIT\r\nNOO")
    assert p.eof_received() is True  # plaintext: half-open until the session closes
    assert await p.readuntil(b"\n") == b"QUIT\r\n"
    with pytest.raises(asyncio.IncompleteReadError) as e:
        await p.readuntil(b"\n")
    assert e.value.partial == b"NOO" and p.at_eof()
    assert await p.read(10) == b""
    with pytest.raises(asyncio.IncompleteReadError):
        await p.readexactly(1)


async def test_a_line_over_the_limit_consumes_nothing() -> None:
    p, _ = _protocol(limit=16)
    p.data_received(b"x" * 20)
    assert p.take_line() is None
    with pytest.raises(asyncio.LimitOverrunError) as e:
        await p.readuntil(b"\n")
    assert e.value.consumed == 20 and len(p.pending_input) == 20
    p.data_received(b"\nNOOP\r\n")
    assert p.take_line() is None  # the LF is past the limit
    with pytest.raises(asyncio.LimitOverrunError) as found:
        await p.readuntil(b"\n")
    assert found.value.consumed == 20
    assert await p.readexactly(21) == b"x" * 20 + b"\n"
    assert p.take_line() == b"NOOP\r\n"


async def test_reading_pauses_over_twice_the_limit_and_resumes_at_it() -> None:
    p, transport = _protocol(limit=10)
    p.data_received(b"a" * 15)
    assert not transport.paused
    p.data_received(b"b" * 15)  # one read larger than the limit, 30 > 2 x 10
    assert transport.paused
    assert p.take(15) == b"a" * 15 and transport.paused  # 15 left: over the limit
    assert p.take(5) == b"bbbbb" and not transport.paused
    assert await p.read(100) == b"b" * 10


async def test_a_paused_reader_waiting_for_more_resumes_reading() -> None:
    p, transport = _protocol(limit=4)
    p.data_received(b"x" * 9)  # no LF, paused
    assert transport.paused
    reading = asyncio.ensure_future(p.readexactly(12))
    await asyncio.sleep(0)
    assert not transport.paused and not reading.done()
    p.data_received(b"yyy")
    assert await reading == b"x" * 9 + b"yyy"


async def test_push_back_and_input_after_the_final_dot() -> None:
    p, _ = _protocol()
    p.data_received(b"body\r\n.\r\nQUIT\r\n")
    data = p.take(1024)
    rest = data[data.index(b".\r\n") + 3 :]
    p.push_back(rest)
    assert p.take_line() == b"QUIT\r\n"


async def test_wait_readable_consumes_nothing() -> None:
    p, _ = _protocol()
    waiting = asyncio.ensure_future(p.wait_readable())
    await asyncio.sleep(0)
    assert not waiting.done()
    p.data_received(b"EHLO early\r\n")
    assert await waiting == b"EHLO early\r\n"
    assert p.take_line() == b"EHLO early\r\n"
    p.eof_received()
    assert await p.wait_readable() == b""


async def test_a_lost_connection_ends_every_wait() -> None:
    p, _ = _protocol()
    reading = asyncio.ensure_future(p.readuntil(b"\n"))
    p.pause_writing()
    draining = asyncio.ensure_future(p.drain())
    await asyncio.sleep(0)
    p.connection_lost(ConnectionResetError("reset"))
    with pytest.raises(ConnectionResetError):
        await reading
    with pytest.raises(ConnectionResetError):
        await draining
    with pytest.raises(ConnectionResetError):
        p.write(b"250 Ok\r\n")
    assert p._input_waiter is None and p._drain_waiter is None


async def test_drain_waits_while_writing_is_paused() -> None:
    p, transport = _protocol()
    await p.drain()  # not paused: returns at once
    p.pause_writing()
    draining = asyncio.ensure_future(p.drain())
    await asyncio.sleep(0)
    assert not draining.done()
    p.resume_writing()
    await draining
    p.write(b"221 Bye\r\n")
    assert transport.written == b"221 Bye\r\n"


class _Probe(StreamProtocol):
    def __init__(self, made: asyncio.Future[_Probe]) -> None:
        super().__init__(64 * 1024)
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.made.set_result(self)


async def test_stream_protocol_on_a_live_connection() -> None:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[_Probe] = loop.create_future()
    server = await loop.create_server(lambda: _Probe(made), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        probe = await made
        assert probe.output_paused is False and probe.over_tls is False
        writer.write(b"NOOP\r\nQUIT\r\n")  # many commands in one read
        await writer.drain()
        assert await probe.readuntil(b"\n") == b"NOOP\r\n"
        probe.push_back(b"RSET\r\n")
        assert probe.take_line() == b"RSET\r\n"
        assert await probe.readuntil(b"\n") == b"QUIT\r\n"
        probe.write(b"221 Bye\r\n")
        await probe.drain()
        assert await reader.readline() == b"221 Bye\r\n"
        writer.write_eof()
        assert await probe.read(10) == b""
        assert probe.at_eof()
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
