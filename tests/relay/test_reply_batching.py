"""Replies to a pipelined group go out in one write (as Postfix flushes only
when no input is left), in order; a command that must wait for its reply
is never held back."""

from __future__ import annotations

from typing import Any

import pytest
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback

from relay.smtpd.server import RelaySMTP


@pytest.fixture
def server_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    writes: list[bytes] = []
    made = RelaySMTP.connection_made

    def spy(self: RelaySMTP, transport: Any) -> None:
        made(self, transport)
        write = self.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        self.write = counted  # type: ignore[method-assign]

    monkeypatch.setattr(RelaySMTP, "connection_made", spy)
    return writes


async def test_group_replies_in_one_write(relay_server: Any, server_writes: list[bytes]) -> None:
    h = await relay_server()
    async with RawClient(h.host, h.port, local=next_loopback(), timeout=10) as c:
        await c.greet()
        server_writes.clear()
        await c.send(
            b"MAIL FROM:<a@client.test>\r\nRCPT TO:<info@example.com>\r\n"
            b"RCPT TO:<x@evil.test>\r\nDATA\r\n"
        )
        assert await c.read_reply() == "250 2.1.0 Ok"
        assert await c.read_reply() == "250 2.1.5 Ok"
        assert (await c.read_reply()).startswith("554 5.7.1")
        assert (await c.read_reply()).startswith("354")
        assert len(server_writes) == 1 and server_writes[0].count(b"\r\n") == 4
        server_writes.clear()
        # One command at a time: one write each, nothing waits.
        await c.send(b"Subject: p\r\n\r\nx\r\n.\r\n")
        assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued")
        assert await c.command("RSET") == "250 2.0.0 Ok"
        assert await c.command("MAIL FROM:<b@client.test>") == "250 2.1.0 Ok"
        assert len(server_writes) == 3
        # A group ending in QUIT: everything before the close.
        await c.send(b"RCPT TO:<info@example.com>\r\nRSET\r\nQUIT\r\n")
        assert await c.read_reply() == "250 2.1.5 Ok"
        assert await c.read_reply() == "250 2.0.0 Ok"
        assert await c.read_reply() == "221 2.0.0 Bye"
