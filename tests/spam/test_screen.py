"""Postscreen against real TCP clients on distinct 127.0.0.x addresses and the real
test DNS server. The server side here is a minimal stand-in for relay.smtpd.server: it
runs screen(), then sends the final "220 " line and echoes one command, which
shows that pregreet bytes are left in the stream for the SMTP engine."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.config import RelayConfig
from relay.dns import Resolver
from relay.smtpd.aiosmtpd_adapter import StreamProtocol
from relay.smtpd.screen import PREGREET_TTL, Postscreen
from relay.smtpd.session import ScreenResult, Session

MakeConfig = Callable[..., RelayConfig]
WAIT = "500ms"  # the greet wait in these tests
SITES = [{"zone": "bl.test", "weight": 1}, {"zone": "bl2.test", "weight": 1}]


@dataclass
class Harness:
    screen: Postscreen
    host: str
    port: int
    results: asyncio.Queue[ScreenResult] = field(default_factory=asyncio.Queue)

    async def connect(self, client_ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, local_addr=(client_ip, 0))

    async def session(
        self, client_ip: str, pregreet: bytes = b""
    ) -> tuple[ScreenResult, list[str]]:
        """One client: optionally talks first; returns the verdict and the lines it read."""
        reader, writer = await self.connect(client_ip)
        if pregreet:
            writer.write(pregreet)
            await writer.drain()
        lines: list[str] = []
        while True:
            line = await reader.readline()
            if not line:
                break
            lines.append(line.decode().rstrip("\r\n"))
            if line.startswith(b"220 "):
                writer.write(b"NOOP hello\r\n" if not pregreet else b"")
                await writer.drain()
            if line.startswith(b"250 "):
                break
        writer.close()
        return await asyncio.wait_for(self.results.get(), 10), lines


class _Served(StreamProtocol):
    """The relay's connection protocol (its input, output and peek), serving `_serve`."""

    def __init__(self, harness: Harness) -> None:
        super().__init__(64 * 1024)
        self.harness = harness
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.task = self.loop.create_task(_serve(self.harness, self))


async def _serve(harness: Harness, conn: _Served) -> None:
    assert conn.transport is not None
    transport = conn.transport
    peer = transport.get_extra_info("peername")
    result = await harness.screen.screen(Session(peer[0], peer[1]), conn)
    harness.results.put_nowait(result)
    try:
        if result.action == "drop":
            if result.reply:
                conn.write(f"{result.reply}\r\n".encode())
            return
        conn.write(b"220 mx.test.example ESMTP\r\n")
        line = await asyncio.wait_for(conn.readuntil(b"\n"), 10)
        conn.write(b"250 got " + line.strip() + b"\r\n")
        await conn.drain()
    except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        transport.close()


@pytest.fixture
async def harness_factory(
    make_config: MakeConfig, resolver: Resolver, tmp_path: Path
) -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def start(
        clock: Callable[[], float] | None = None, cache_dir: Path | None = None, **policy: Any
    ) -> Harness:
        policy.setdefault("postscreen", {})
        policy["postscreen"].setdefault("greet", {"action": "enforce", "wait": WAIT})
        config = make_config(**policy)
        kwargs = {"clock": clock} if clock else {}
        screen = Postscreen(config, resolver, cache_dir or tmp_path / "cache", **kwargs)
        h = Harness(screen, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Served(h), "127.0.0.1", 0)
        h.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return h

    yield start
    for s in servers:
        s.close()
        await s.wait_closed()


async def test_clean_client_passes_new_then_old(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory(postscreen={"dnsbl": {"sites": SITES}})
    result, lines = await h.session("127.0.0.20")
    assert result.action == "pass" and not result.cached and result.dnsbl_score == 0
    assert lines == ["220-mx.test.example ESMTP", "220 mx.test.example ESMTP", "250 got NOOP hello"]
    result, lines = await h.session("127.0.0.20")  # returning client: no teaser, no wait
    assert result.action == "pass" and result.cached
    assert lines[0] == "220 mx.test.example ESMTP"


async def test_pregreet_enforce_keeps_the_bytes_for_smtpd(
    harness_factory: Callable[..., Any],
) -> None:
    h = await harness_factory()
    result, lines = await h.session("127.0.0.23", pregreet=b"EHLO early.test\r\n")
    assert result.action == "enforce" and result.reason == "pregreet"
    assert str(result.reply) == "550 5.5.1 Protocol error"
    # The pregreeted command was not consumed: the SMTP engine reads it after "220 ".
    assert lines[-1] == "250 got EHLO early.test"
    result, _ = await h.session("127.0.0.23")  # a failed client is never cached as passed
    assert not result.cached


async def test_pregreet_drop(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory(postscreen={"greet": {"action": "drop", "wait": WAIT}})
    result, lines = await h.session("127.0.0.24", pregreet=b"HELO x\r\n")
    assert result.action == "drop" and result.reply is not None and result.reply.disconnect
    assert lines == ["220-mx.test.example ESMTP", "521 5.5.1 Protocol error"]


async def test_pregreet_ignore(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory(postscreen={"greet": {"action": "ignore", "wait": WAIT}})
    result, _ = await h.session("127.0.0.25", pregreet=b"HELO x\r\n")
    assert result.action == "pass"


async def test_dnsbl_enforce_and_drop(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory(postscreen={"dnsbl": {"sites": SITES}})
    result, _ = await h.session("127.0.0.10")
    assert result.action == "enforce" and result.reason == "dnsbl" and result.dnsbl_score == 1
    assert str(result.reply) == (
        "550 5.7.1 Service unavailable; client [127.0.0.10] blocked using bl.test"
    )
    h = await harness_factory(postscreen={"dnsbl": {"sites": SITES, "action": "drop"}})
    result, lines = await h.session("127.0.0.13")
    assert result.action == "drop"
    assert lines[-1] == "521 5.7.1 Service unavailable; client [127.0.0.13] blocked using bl2.test"


async def test_error_answers_and_broken_lists_are_not_obeyed(
    harness_factory: Callable[..., Any],
) -> None:
    sites = [{"zone": "bl.test"}, {"zone": "broken.test"}]
    h = await harness_factory(postscreen={"dnsbl": {"sites": sites}})
    result, _ = await h.session("127.0.0.12")  # bl.test answers 127.255.255.254
    assert result.action == "pass" and result.dnsbl_score == 0
    result, _ = await h.session("127.0.0.20")  # broken.test lists everyone
    assert result.action == "pass" and result.dnsbl_score == 0


async def test_weights_and_threshold(harness_factory: Callable[..., Any]) -> None:
    sites = [
        {"zone": "bl.test", "weight": 2},
        {"zone": "bl2.test", "weight": 1},
        {"zone": "allow.test", "returnCodes": ["127.0.[0..255].1"], "weight": -2},
    ]
    h = await harness_factory(postscreen={"dnsbl": {"sites": sites, "threshold": 2}})
    result, _ = await h.session("127.0.0.13")  # only bl2.test: 1 < 2
    assert result.action == "pass" and result.dnsbl_score == 1
    result, _ = await h.session("127.0.0.10")  # bl.test: 2
    assert result.action == "enforce" and result.dnsbl_score == 2
    result, _ = await h.session("127.0.0.15")  # bl.test 2, allow.test -2
    assert result.action == "pass" and result.dnsbl_score == 0


async def test_allowlist_threshold_skips_the_other_tests(
    harness_factory: Callable[..., Any],
) -> None:
    sites = [
        {"zone": "bl.test"},
        {"zone": "allow.test", "returnCodes": ["127.0.5.1"], "weight": -2},
    ]
    h = await harness_factory(
        postscreen={
            "greet": {"action": "enforce", "wait": "20s"},  # ends early once DNS is in
            "dnsbl": {"sites": sites, "allowlistThreshold": -1},
        }
    )
    result, _ = await h.session("127.0.0.14")
    assert result.action == "pass" and result.allowlisted and result.dnsbl_score == -2
    result, lines = await h.session("127.0.0.14")
    assert result.cached and result.allowlisted
    assert lines[0] == "220 mx.test.example ESMTP"


async def test_access_list(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory(
        network={
            "mynetworks": ["127.0.0.40/32"],
            "clientAccess": [
                {"cidr": "127.0.0.41/32", "action": "permit"},
                {"cidr": "127.0.0.42/32", "action": "reject"},
            ],
        },
        postscreen={"denylist": {"action": "drop"}, "dnsbl": {"sites": SITES}},
    )
    for ip in ("127.0.0.40", "127.0.0.41"):
        result, lines = await h.session(ip)
        assert result.allowlisted and lines[0] == "220 mx.test.example ESMTP"  # no tests at all
    result, lines = await h.session("127.0.0.42")
    assert result.action == "drop" and lines == ["521 5.3.2 Service currently unavailable"]


async def test_hangup_during_the_wait(harness_factory: Callable[..., Any]) -> None:
    h = await harness_factory()
    reader, writer = await h.connect("127.0.0.26")
    await reader.readline()  # the teaser
    writer.close()
    result = await asyncio.wait_for(h.results.get(), 10)
    assert result.action == "drop" and result.reason == "hangup" and result.reply is None


async def test_cache_survives_a_restart_and_expires(
    harness_factory: Callable[..., Any], tmp_path: Path
) -> None:
    now = [1_000_000.0]
    cache = tmp_path / "volume"
    policy = {"postscreen": {"dnsbl": {"sites": SITES}}}
    h = await harness_factory(clock=lambda: now[0], cache_dir=cache, **policy)
    result, _ = await h.session("127.0.0.20")
    assert not result.cached
    await h.screen.close()
    assert (cache / "postscreen-cache.json").exists()

    restarted = await harness_factory(clock=lambda: now[0], cache_dir=cache, **policy)
    result, _ = await restarted.session("127.0.0.20")
    assert result.cached  # PASS OLD after the restart

    now[0] += 301  # the DNSBL answer's TTL (300 s, raised to at least 60 s) is over
    result, lines = await restarted.session("127.0.0.20")
    assert not result.cached
    assert lines[0] == "220 mx.test.example ESMTP"  # pregreet still valid: no teaser
    now[0] += PREGREET_TTL + 1
    result, lines = await restarted.session("127.0.0.20")
    assert not result.cached and lines[0].startswith("220-")
