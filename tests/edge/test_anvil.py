"""Per-client limits (relay.smtpd.anvil): Postfix's reply codes, mynetworks exempt,
windows on an injected clock, a bounded table under address spraying."""

from __future__ import annotations

import asyncio
import tracemalloc
from pathlib import Path

from mrtest.edgeserver import edge_config
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback

from relay.config import Limits
from relay.smtpd.anvil import Anvil
from relay.smtpd.session import Session


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def session(ip: str, trusted: bool = False) -> Session:
    return Session(client_ip=ip, trusted=trusted)


def test_connection_count_and_rate() -> None:
    clock = FakeClock()
    anvil = Anvil(clock=clock)
    limits = Limits(connections_per_client=2, connection_rate_per_client=3)
    s = session("192.0.2.1")
    assert anvil.connect(s, limits, "mx.test") is None
    assert anvil.connect(s, limits, "mx.test") is None
    reply = anvil.connect(s, limits, "mx.test")
    assert reply is not None and reply.disconnect
    assert str(reply) == "421 4.7.0 mx.test Error: too many connections from 192.0.2.1"
    for _ in range(3):
        anvil.disconnect("192.0.2.1")
    # Count is fine again, but this is the 4th connection this minute.
    assert str(anvil.connect(s, limits, "mx.test")).startswith("421 4.7.0")
    anvil.disconnect("192.0.2.1")
    clock.now += 60  # anvil_rate_time_unit later: a new window
    assert anvil.connect(s, limits, "mx.test") is None
    # Another client is not affected by any of this.
    assert anvil.connect(session("192.0.2.2"), limits, "mx.test") is None


def test_message_and_recipient_rates_and_exemption() -> None:
    clock = FakeClock()
    anvil = Anvil(clock=clock)
    limits = Limits(message_rate_per_client=2, recipient_rate_per_client=3)
    s = session("198.51.100.4")
    assert [anvil.message(s, limits) for _ in range(2)] == [None, None]
    assert str(anvil.message(s, limits)) == "450 4.7.1 Error: too much mail from 198.51.100.4"
    assert [anvil.recipient(s, limits) for _ in range(3)] == [None] * 3
    assert str(anvil.recipient(s, limits)) == (
        "450 4.7.1 Error: too many recipients from 198.51.100.4"
    )
    clock.now += 61
    assert anvil.message(s, limits) is None and anvil.recipient(s, limits) is None
    # mynetworks: never counted, never stored.
    trusted = session("10.0.0.1", trusted=True)
    for _ in range(100):
        assert anvil.connect(trusted, Limits(connections_per_client=1), "mx") is None
        assert anvil.message(trusted, limits) is None
    assert "10.0.0.1" not in anvil._clients
    # Off (0): nothing stored either.
    assert anvil.message(session("198.51.100.5"), Limits()) is None
    assert "198.51.100.5" not in anvil._clients


def test_table_stays_bounded_under_address_spraying() -> None:
    """A flood from 100,000 addresses, each connecting once (and hanging up),
    all inside one rate window: the table never holds more than max_clients,
    and its memory stays flat."""
    clock = FakeClock()
    anvil = Anvil(clock=clock, max_clients=10_000)
    limits = Limits(connection_rate_per_client=5)
    # Some clients stay connected through the flood: never evicted.
    holders = [session(f"203.0.113.{i}") for i in range(1, 51)]
    for h in holders:
        assert anvil.connect(h, limits, "mx") is None
    tracemalloc.start()
    peak_after_fill = 0
    for n in range(100_000):
        ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        anvil.connect(session(ip), limits, "mx")
        anvil.disconnect(ip)
        if n == 20_000:
            peak_after_fill = tracemalloc.get_traced_memory()[0]
        assert len(anvil) <= 10_000
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert current < peak_after_fill * 1.2 + 1_000_000
    assert anvil.evicted >= 100_000 - 10_000
    for h in holders:
        assert anvil._clients[h.client_ip].connections == 1
    # Once the window is over, idle entries drain away as events come in.
    clock.now += 120
    for _ in range(5_000):
        anvil.connect(session("192.0.2.200"), limits, "mx")
        anvil.disconnect("192.0.2.200")
    assert len(anvil) < 200


# -- through the SMTP server -------------------------------------------------------------


async def test_connection_limit_421_while_others_are_served(edge_server, tmp_path: Path) -> None:
    friend = next_loopback()
    config = edge_config(
        tmp_path,
        spec={
            "limits": {"connectionsPerClient": 3},
            "network": {"mynetworks": [f"{friend}/32"]},
        },
    )
    edge = await edge_server(config)
    flooder, other = next_loopback(), next_loopback()
    open_clients = []
    for _ in range(3):
        c = await RawClient(*edge.address, local=flooder, timeout=10).__aenter__()
        assert (await c.read_reply()).startswith("220")
        open_clients.append(c)
    async with RawClient(*edge.address, local=flooder, timeout=10) as c:
        assert await c.read_reply() == (
            f"421 4.7.0 mx.relay.test Error: too many connections from {flooder}"
        )
        assert await c.closed()
    async with RawClient(*edge.address, local=other, timeout=10) as c:
        assert (await c.greet()).startswith("250")
    # mynetworks is exempt from the count.
    friends = [
        await RawClient(*edge.address, local=friend, timeout=10).__aenter__() for _ in range(5)
    ]
    for c in friends:
        assert (await c.read_reply()).startswith("220")
    for c in [*open_clients, *friends]:
        await c.__aexit__(None, None, None)
    await asyncio.sleep(0.1)  # connection_lost runs
    async with RawClient(*edge.address, local=flooder, timeout=10) as c:
        assert (await c.read_reply()).startswith("220")


async def test_message_recipient_rates_and_error_limit(edge_server, tmp_path: Path) -> None:
    config = edge_config(
        tmp_path,
        spec={
            "limits": {
                "messageRatePerClient": 2,
                "recipientRatePerClient": 3,
                "errorsPerSession": 4,
            }
        },
    )
    edge = await edge_server(config)
    client = next_loopback()
    async with RawClient(*edge.address, local=client, timeout=10) as c:
        await c.greet()
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
        for _ in range(3):
            assert (await c.command("RCPT TO:<x@example.org>")).startswith("250")
        assert await c.command("RCPT TO:<y@example.org>") == (
            f"450 4.7.1 Error: too many recipients from {client}"
        )
        assert (await c.command("RSET")).startswith("250")
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await c.command("RSET")).startswith("250")
        assert await c.command("MAIL FROM:<a@client.test>") == (
            f"450 4.7.1 Error: too much mail from {client}"
        )
    # Another client has its own budget.
    async with RawClient(*edge.address, local=next_loopback(), timeout=10) as c:
        await c.greet()
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
    # errorsPerSession: the 4th error closes the session.
    async with RawClient(*edge.address, local=next_loopback(), timeout=10) as c:
        await c.greet()
        for _ in range(4):
            assert (await c.command("BOGUS")).startswith("502")
        assert await c.command("NOOP") == "421 4.7.0 mx.relay.test Error: too many errors"
