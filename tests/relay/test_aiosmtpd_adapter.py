"""What relay.smtpd.aiosmtpd_adapter relies on in aiosmtpd and asyncio: fails
loudly, naming the thing that moved, when either changes underneath."""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from importlib import metadata
from pathlib import Path

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.smtpd.aiosmtpd_adapter import TESTED_AIOSMTPD, StreamProtocol, peek, wait_readable
from relay.smtpd.server import RelaySMTP

ROOT = Path(__file__).resolve().parents[2]
# asyncio.StreamReader and friends on either loop the workers may run on.
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


def test_smtp_is_a_stream_reader_protocol_that_wires_reader_and_writer() -> None:
    assert issubclass(SMTP, asyncio.StreamReaderProtocol)
    params = list(inspect.signature(SMTP._cb_client_connected).parameters)
    assert params == ["self", "reader", "writer"]


def test_every_protocol_callback_of_aiosmtpd_is_overridden() -> None:
    """aiosmtpd's own callbacks would start its command loop and hooks, for
    which SMTP.__init__ (never called here) sets the attributes."""
    callbacks = {
        "connection_made",
        "connection_lost",
        "eof_received",
        "data_received",
        "pause_writing",
        "resume_writing",
        "get_buffer",
        "buffer_updated",
    }
    defined_by_aiosmtpd = callbacks & set(vars(SMTP))
    assert defined_by_aiosmtpd == {"connection_made", "connection_lost", "eof_received"}
    for name in defined_by_aiosmtpd:
        assert getattr(RelaySMTP, name) is not getattr(SMTP, name), name
    # The flow-control callbacks StreamProtocol extends are asyncio's.
    for name in ("pause_writing", "resume_writing"):
        assert name not in vars(SMTP), name


async def test_stream_reader_internals() -> None:
    reader = asyncio.StreamReader(limit=1024)
    buffer = reader._buffer  # type: ignore[attr-defined]
    assert isinstance(buffer, bytearray)
    reader.feed_data(b"MAIL FROM:<a@b>\r\nRCPT")
    assert peek(reader) == b"MAIL FROM:<a@b>\r\nRCPT"
    assert await reader.readuntil(b"\n") == b"MAIL FROM:<a@b>\r\n"
    assert await reader.read(2) == b"RC"
    # Changed in place: the adapter keeps a reference to it for the session.
    assert reader._buffer is buffer and buffer == b"PT"  # type: ignore[attr-defined]
    wait = reader._wait_for_data  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wait)
    assert list(inspect.signature(wait).parameters) == ["func_name"]


async def test_wait_readable_consumes_nothing() -> None:
    reader = asyncio.StreamReader()
    waiting = asyncio.ensure_future(wait_readable(reader))
    await asyncio.sleep(0)
    assert not waiting.done()
    reader.feed_data(b"EHLO early\r\n")
    assert await waiting == b"EHLO early\r\n"
    assert await reader.readline() == b"EHLO early\r\n"
    reader.feed_eof()
    assert await wait_readable(reader) == b""


class _Probe(StreamProtocol):
    def __init__(self, made: asyncio.Future[_Probe]) -> None:
        super().__init__(64 * 1024)
        self.made = made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)
        self.made.set_result(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.detach(error)


async def test_stream_protocol_on_a_live_connection() -> None:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[_Probe] = loop.create_future()
    server = await loop.create_server(lambda: _Probe(made), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        probe = await made
        assert probe.reader is probe._reader and probe.writer is probe._writer
        assert probe.pending_input is probe.reader._buffer  # type: ignore[attr-defined]
        assert probe.output_paused is False and probe.over_tls is False
        # What use_tls_transport re-points after loop.start_tls.
        transport = probe.transport
        assert transport is not None
        assert probe._transport is transport  # type: ignore[attr-defined]
        assert probe.reader._transport is transport  # type: ignore[attr-defined]
        assert probe.writer._transport is transport  # type: ignore[attr-defined]
        writer.write(b"NOOP\r\nQUIT\r\n")
        await writer.drain()
        assert await probe.reader.readuntil(b"\n") == b"NOOP\r\n"
        probe.push_back(b"RSET\r\n")
        assert await probe.reader.readuntil(b"\n") == b"RSET\r\n"
        assert await probe.reader.readuntil(b"\n") == b"QUIT\r\n"
        probe.writer.write(b"221 Bye\r\n")
        assert await reader.readline() == b"221 Bye\r\n"
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
