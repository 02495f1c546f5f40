"""Backscatter control: a `recipients: listed` domain rejects unknown users
at RCPT (so a forged sender is never bounced to), and spec.queue.dsnOnExpiry
decides whether expired mail is returned at all."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from mrtest.delivery_helpers import FakeClock, Sink, free_port, message
from mrtest.edgeserver import edge_config
from mrtest.peers import RawClient, swaks
from mrtest.relayproc import next_loopback

from relay.config import Domain, NextHop, QueuePolicy, RelayConfig
from relay.delivery.qmgr import Delivery
from relay.dns import Resolver
from relay.queue.store import Queue


async def test_listed_domain_rejects_unknown_users_at_rcpt(edge_server, tmp_path: Path) -> None:
    """A spammer forges a real user of ours as the sender and writes to a
    user that does not exist: refused in the SMTP dialogue, nothing queued,
    so there is nothing to bounce (the client's own MTA gets the 550)."""
    edge = await edge_server(edge_config(tmp_path))
    async with RawClient(*edge.address, local=next_loopback(), timeout=10) as c:
        await c.greet()
        assert (await c.command("MAIL FROM:<joe@example.com>")).startswith("250")
        assert await c.command("RCPT TO:<nobody@example.com>") == (
            "550 5.1.1 <nobody@example.com>: Recipient address rejected: "
            "User unknown in relay recipient table"
        )
        assert await c.command("RCPT TO:<NoBody@Example.COM>") != "250 2.1.5 Ok"
        assert (await c.command("DATA")).startswith("554 5.5.1")
    assert edge.queued() == []
    # Through a real client too, several unknown users in one go.
    result = await asyncio.to_thread(
        swaks,
        edge.address,
        to=["ghost1@example.com", "ghost2@example.com"],
        sender="info@example.com",
        local=next_loopback(),
    )
    assert result.returncode != 0
    assert result.output.count("550 5.1.1") == 2
    assert edge.queued() == []


@pytest.mark.parametrize("dsn_on_expiry", ["sender", "none"])
async def test_dsn_on_expiry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, dsn_on_expiry: str
) -> None:
    """The next hop is down until the mail expires; the (possibly forged)
    sender is in a relay domain, so a DSN could reach it."""
    caplog.set_level(logging.INFO, logger="relay.delivery")
    clock = FakeClock()
    down = next_loopback()
    home = await Sink(host=next_loopback()).start()
    config = RelayConfig(
        name="t",
        hostname="relay.test",
        domains={
            "example.com": Domain("example.com", NextHop(down, free_port(down), tls="none"), "any"),
            "example.org": Domain("example.org", NextHop(home.host, home.port, tls="none"), "any"),
        },
        recipients=set(),
        queue=QueuePolicy(
            lifetime=3600, min_backoff=300, max_backoff=600, dsn_on_expiry=dsn_on_expiry
        ),
    )
    queue = Queue(tmp_path / "queue", clock=clock)
    delivery = Delivery(queue, lambda: config, Resolver(), clock)
    try:
        await delivery.recover()
        msg = queue.incoming()
        msg.write(message())
        qid = await msg.commit("victim@example.org", ["b@example.com"], "192.0.2.1")
        delivery.wake(qid)
        await delivery.idle()
        for _ in range(50):
            pending = list(queue.messages())
            if not pending:
                break
            clock.now = pending[0].next_attempt
            await delivery.process_due()
        assert list(queue.messages()) == []
    finally:
        await delivery.stop(grace=5)
        await home.stop()
        await queue.close()
    if dsn_on_expiry == "sender":
        assert "status=expired, returned to sender" in caplog.text
        [dsn] = home.messages
        assert dsn.sender in ("", "<>") and dsn.recipients == ["victim@example.org"]
    else:
        assert "status=expired, not returned (dsnOnExpiry: none)" in caplog.text
        assert home.messages == []
