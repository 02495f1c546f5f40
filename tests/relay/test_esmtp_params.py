"""MAIL and RCPT parameters (SMTPUTF8, BODY, RFC 3461 DSN) over real TCP
sessions: Postfix's replies (checked against Postfix 3.7 with
smtputf8_enable=yes), and what reaches the queue."""

from __future__ import annotations

import asyncio

import pytest
from mrtest.peers import RawClient, swaks
from mrtest.relayproc import next_loopback

from relay.queue.format import ACTIVE, read_envelope
from relay.queue.mailparams import MailParams, RecipientParams

from .conftest import Harness, ServerFactory

pytestmark = pytest.mark.asyncio

# What Postfix 3.7 (smtputf8_enable=yes) answers; each line in a fresh transaction.
MAIL_REPLIES = [
    ("MAIL FROM:<a@example.org> RET=HDRS RET=FULL", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> RET=BOGUS", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> RET=", "501 5.5.4 Bad RET parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+2", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=abc ENVID=d", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+0Ab", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> SMTPUTF8=x", "555 5.5.4 Unsupported option: SMTPUTF8=x"),
    ("MAIL FROM:<a@example.org> BODY=BINARYMIME", "555 5.5.4 Unsupported option: BODY=BINARYMIME"),
    ("MAIL FROM:<a@example.org> BODY=binarymime", "555 5.5.4 Unsupported option: BODY=binarymime"),
    ("MAIL FROM:<a@example.org> BODY=", "555 5.5.4 Unsupported option: BODY="),
    # Stricter than Postfix: RFC 3461's 100 characters, xtext is ASCII.
    ("MAIL FROM:<a@example.org> ENVID=" + "x" * 101, "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=aü", "501 5.5.4 Bad ENVID parameter syntax"),
    ("MAIL FROM:<a@example.org> ENVID=a+4a", "250 2.1.0 Ok"),
    ("MAIL FROM:<ü@example.org>", "250 2.1.0 Ok"),  # Postfix too, without SMTPUTF8
    ("MAIL FROM:<a@example.org> body=8bitmime smtputf8 RET=hdrs ENVID=x+2By", "250 2.1.0 Ok"),
]
RCPT_REPLIES = [
    (
        "RCPT TO:<b@example.org> NOTIFY=NEVER,SUCCESS",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    ("RCPT TO:<b@example.org> NOTIFY=BOGUS", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    ("RCPT TO:<b@example.org> NOTIFY=", "501 5.5.4 Error: Bad NOTIFY parameter syntax"),
    (
        "RCPT TO:<b@example.org> NOTIFY=SUCCESS NOTIFY=DELAY",
        "501 5.5.4 Error: Bad NOTIFY parameter syntax",
    ),
    ("RCPT TO:<b@example.org> ORCPT=rfc822", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("RCPT TO:<b@example.org> ORCPT=rfc822;a+zz", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    ("RCPT TO:<b@example.org> ORCPT=;abc", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (
        "RCPT TO:<b@example.org> ORCPT=rfc822;b@example.org ORCPT=rfc822;c@x",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    ("RCPT TO:<b@example.org> FOO=bar", "555 5.5.4 Unsupported option: FOO=bar"),
    # Stricter than Postfix: no control character, surrogate or 500+ characters in an ORCPT.
    ("RCPT TO:<b@example.org> ORCPT=rfc822;a+0Ab", "501 5.5.4 Error: Bad ORCPT parameter syntax"),
    (
        "RCPT TO:<b@example.org> ORCPT=utf-8;\\x{D800}@example.org",
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    (
        "RCPT TO:<b@example.org> ORCPT=rfc822;" + "a" * 500,
        "501 5.5.4 Error: Bad ORCPT parameter syntax",
    ),
    ("RCPT TO:<b@example.org> NOTIFY=never", "250 2.1.5 Ok"),
    ("RCPT TO:<b@example.org> NOTIFY=SUCCESS,SUCCESS", "250 2.1.5 Ok"),
    ("RCPT TO:<b@example.org> ORCPT=x-foo;abc", "250 2.1.5 Ok"),
    ("RCPT TO:<b@example.org> ORCPT=utf-8;\\x{FC}b@example.org", "250 2.1.5 Ok"),
    ("RCPT TO:<b@example.org> ORCPT=utf-8;ü@example.org", "250 2.1.5 Ok"),
    ("RCPT TO:<ü@example.org> NOTIFY=success,failure ORCPT=rfc822;b+40example.org", "250 2.1.5 Ok"),
]


async def session(h: Harness) -> RawClient:
    c = RawClient(h.host, h.port, local=next_loopback(), timeout=10)
    await c.__aenter__()
    ehlo = await c.greet()
    assert "250-DSN" in ehlo.split("\n") and "250 SMTPUTF8" in ehlo.split("\n")
    return c


async def test_mail_parameters_answered_as_postfix(relay_server: ServerFactory) -> None:
    c = await session(await relay_server())
    for line, expected in MAIL_REPLIES:
        assert await c.command(line) == expected, line
        assert await c.command("RSET") == "250 2.0.0 Ok"


async def test_rcpt_parameters_answered_as_postfix(relay_server: ServerFactory) -> None:
    c = await session(await relay_server())
    assert await c.command("MAIL FROM:<a@example.org>") == "250 2.1.0 Ok"
    for line, expected in RCPT_REPLIES:
        assert await c.command(line) == expected, line


async def test_parameters_need_ehlo(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = RawClient(h.host, h.port, local=next_loopback(), timeout=10)
    await c.__aenter__()
    await c.read_reply()
    assert (await c.command("HELO client.test")).startswith("250")
    assert await c.command("MAIL FROM:<a@example.org> SMTPUTF8") == (
        "501 5.5.4 Syntax: MAIL FROM:<address>"
    )


def envelopes(h: Harness) -> list[MailParams]:
    out = []
    for f in sorted((h.queue.directory / ACTIVE).iterdir()):
        with f.open("rb") as fh:
            out.append(read_envelope(fh.fileno()).params)
    return out


async def test_parameters_reach_the_queue(relay_server: ServerFactory) -> None:
    h = await relay_server()
    h.ctx.on_queued = None  # nothing delivers: the file stays in active/
    c = await session(h)
    commands = [
        "MAIL FROM:<sénder@example.org> SMTPUTF8 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1",
        "RCPT TO:<ü@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=utf-8;\\x{FC}@example.org",
        "RCPT TO:<b@example.org> NOTIFY=NEVER",
        "RCPT TO:<c@example.org>",
        "RCPT TO:<b@example.org> NOTIFY=SUCCESS",  # a repeat: the first one counts
    ]
    for line in commands:
        assert (await c.command(line)).startswith("250"), line
    assert (await c.command("DATA")).startswith("354")
    await c.send("Subject: Grüße\r\n\r\nKäse\r\n.\r\n".encode())
    assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued as")
    [data] = h.queued()
    assert b"\tby " in data and b") with UTF8SMTP id " in data  # as Postfix
    assert "Subject: Grüße\r\n\r\nKäse\r\n".encode() in data
    assert envelopes(h) == [
        MailParams(
            smtputf8=True,
            body="8BITMIME",
            ret="HDRS",
            envid="QQ+1",
            recipients={
                "ü@example.org": RecipientParams(("SUCCESS", "FAILURE"), "utf-8", "ü@example.org"),
                "b@example.org": RecipientParams(("NEVER",)),
            },
        )
    ]


async def test_swaks_sees_the_extensions_and_sends_8bit(relay_server: ServerFactory) -> None:
    h = await relay_server()
    h.ctx.on_queued = None
    result = await asyncio.to_thread(
        swaks,
        h.address,
        to="info@example.org",
        local=next_loopback(),
        data="Subject: Grüße\n\nKäse und Brötchen\n",
        extra=["--protocol", "ESMTP"],
    )
    assert result.returncode == 0, result.output
    assert "250-DSN" in result.output and "250 SMTPUTF8" in result.output
    [data] = h.queued()
    assert "Käse und Brötchen".encode() in data
