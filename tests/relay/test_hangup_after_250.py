"""A client that hangs up right after the 250 of DATA: connection_lost cancels
the session while it is still in the reply, and the message must be handed to
delivery all the same (it was left as a fresh claim no rescan picks up, found
by bench/policy_vs_postfix.py: about 2 of 5,000 messages never delivered)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mrtest.peers import RawClient
from mrtest.relayproc import next_loopback

from relay.smtpd.server import RelaySMTP

from .conftest import ServerFactory

pytestmark = pytest.mark.asyncio


async def test_mail_of_a_client_gone_after_250_is_handed_to_delivery(
    relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await relay_server()
    woken: list[str] = []
    h.ctx.on_queued = woken.append
    reply = RelaySMTP.reply

    async def reply_then_hang_up(
        self: RelaySMTP, code: int, status: str, text: str, **kw: Any
    ) -> None:
        await reply(self, code, status, text, **kw)
        if text.startswith("Ok: queued as"):
            # What connection_lost does to a session awaiting its reply's drain.
            raise asyncio.CancelledError

    monkeypatch.setattr(RelaySMTP, "reply", reply_then_hang_up)
    async with RawClient(h.host, h.port, local=next_loopback(), timeout=10) as c:
        await c.greet()
        assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
        assert (await c.command("RCPT TO:<info@example.com>")).startswith("250")
        assert (await c.command("DATA")).startswith("354")
        await c.send(b"Subject: t\r\n\r\nhello\r\n.\r\n")
        queued = await c.read_reply()
    assert queued.startswith("250 2.0.0 Ok: queued as ")
    assert woken == [queued.rsplit(" ", 1)[1]]
