"""Milters in the SMTP session (Postfix's smtpd_milters): each stage's event
answered by a scripted milter, end-of-message edits, quarantine and discard
in the queue, a milter that is down or hangs, and rspamd end to end."""

from __future__ import annotations

import dataclasses
import os
import socket
from pathlib import Path

import pytest
from mrtest.peers import RawClient
from mrtest.realmilters import REJECT_MARKER, dkim_key, have, opendkim, rspamd
from mrtest.relayproc import next_loopback
from mrtest.testmilter import (
    DISCARD,
    REJECT,
    TEMPFAIL,
    ScriptedMilter,
    add_header,
    cstr,
    reply,
)

from relay.config import Milter, RelayConfig
from relay.queue.format import HOLD, INCOMING
from relay.smtpd import milter as m

from .conftest import Harness, ServerFactory, make_config

TEMPFAIL_TEXT = "451 4.7.1 Service unavailable - try again later"
MESSAGE = b"Subject: t\r\nFrom: a@client.test\r\n\r\nhello\r\n"


def with_milters(tmp_path: Path, *milters: Milter) -> RelayConfig:
    return dataclasses.replace(make_config(tmp_path), milters=milters)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def session(h: Harness) -> RawClient:
    c = RawClient(h.host, h.port, local=next_loopback(), timeout=10)
    await c.__aenter__()
    return c


async def transaction(c: RawClient, body: bytes = MESSAGE) -> str:
    """MAIL, RCPT, DATA and the message; the first reply that is not a go-ahead."""
    for command in ("MAIL FROM:<a@client.test>", "RCPT TO:<info@example.com>", "DATA"):
        answer = await c.command(command)
        if not answer.startswith(("250", "354")):
            return answer
    await c.send(body + b".\r\n")
    return await c.read_reply()


@pytest.fixture
async def milter():
    server = ScriptedMilter()
    yield server
    await server.stop()


async def start(relay_server: ServerFactory, tmp_path: Path, address: str, **kw) -> Harness:
    return await relay_server(config=with_milters(tmp_path, Milter("test", address, **kw)))


@pytest.mark.parametrize(
    ("event", "packet", "command", "expected"),
    [
        (m.HELO, TEMPFAIL, "EHLO", TEMPFAIL_TEXT),
        (m.MAIL, REJECT, "MAIL", "550 5.7.1 Command rejected"),
        (m.RCPT, reply("550 5.1.1 no such user"), "RCPT", "550 5.1.1 no such user"),
        (m.DATA, TEMPFAIL, "DATA", TEMPFAIL_TEXT),
        (m.HEADER, REJECT, "END", "550 5.7.1 Command rejected"),
        (m.BODYEOB, reply("554 5.7.1 spam"), "END", "554 5.7.1 spam"),
    ],
)
async def test_each_stage_answers_with_the_milters_refusal(
    relay_server: ServerFactory,
    tmp_path: Path,
    milter: ScriptedMilter,
    event,
    packet,
    command,
    expected,
):
    milter.answers = {event: [packet]}
    h = await start(relay_server, tmp_path, await milter.start())
    c = await session(h)
    assert (await c.read_reply()).startswith("220")
    ehlo = await c.command("EHLO client.test")
    if command == "EHLO":
        assert ehlo == expected
        return
    answer = await transaction(c)
    assert answer == expected
    assert h.queued() == []
    # The session goes on: the next transaction is asked again.
    milter.answers = {}
    assert await c.command("RSET") == "250 2.0.0 Ok"
    assert (await transaction(c)).startswith("250 2.0.0 Ok: queued as ")
    assert m.ABORT in milter.events or command == "END"


async def test_connect_refusal_replaces_the_greeting(
    relay_server: ServerFactory, tmp_path: Path, milter: ScriptedMilter
):
    milter.answers = {m.CONNECT: [reply("554 5.7.1 go away")]}
    h = await start(relay_server, tmp_path, await milter.start())
    c = await session(h)
    assert (await c.read_reply()).split("\n")[-1] == "554 5.7.1 go away"
    assert (await c.command("EHLO client.test")).startswith("503 5.7.0")
    assert await c.command("QUIT") == "221 2.0.0 Bye"


async def test_edits_reach_the_queue(relay_server: ServerFactory, tmp_path: Path, milter):
    milter.answers = {
        m.BODYEOB: [
            add_header("X-Milter", "seen"),
            (m.R_ADDRCPT, cstr("<joe@example.com>")),
            (m.R_CHGFROM, cstr("<bounces@client.test>")),
            (m.R_CONTINUE, b""),
        ]
    }
    h = await start(relay_server, tmp_path, await milter.start())
    c = await session(h)
    await c.greet()
    answer = await transaction(c, MESSAGE + b"x" * 80 + b"\r\n" * 5000)
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    queue_id = answer.rsplit(" ", 1)[1]
    [data] = h.queued()
    head, _, body = data.partition(b"\r\n\r\n")
    assert f" id {queue_id}".encode() in head  # our Received header follows the new file
    assert head.endswith(b"From: a@client.test\r\nX-Milter: seen")
    assert body == b"hello\r\n" + b"x" * 80 + b"\r\n" * 5000
    message = await h.queue.run_io(h.queue.read_message_sync, queue_id, "active")
    assert message is not None
    assert message.sender == "bounces@client.test"
    assert message.all_recipients == ["info@example.com", "joe@example.com"]
    # The milter saw our Received header first, then the client's.
    assert milter.headers[0][0] == "Received" and milter.headers[1] == ("Subject", "t")
    assert milter.macros[m.DATA]["i"] != "" and milter.macros[m.CONNECT]["j"] == "mx.relay.test"
    await h.queue.settle()
    assert os.listdir(h.queue.directory / INCOMING) == []


async def test_quarantine_holds_and_discard_drops(
    relay_server: ServerFactory, tmp_path: Path, milter: ScriptedMilter
):
    milter.answers = {m.BODYEOB: [(m.R_QUARANTINE, cstr("held for review")), (m.R_CONTINUE, b"")]}
    h = await start(relay_server, tmp_path, await milter.start())
    c = await session(h)
    await c.greet()
    answer = await transaction(c)
    queue_id = answer.rsplit(" ", 1)[1]
    await h.queue.settle()
    assert await h.queue.run_io(h.queue.locate_sync, queue_id) == HOLD
    milter.answers = {m.BODYEOB: [DISCARD]}
    answer = await transaction(c)
    assert answer.startswith("250 2.0.0 Ok: queued as ")
    discarded = answer.rsplit(" ", 1)[1]
    await h.queue.settle()
    assert await h.queue.run_io(h.queue.locate_sync, discarded) is None
    assert os.listdir(h.queue.directory / INCOMING) == []


@pytest.mark.parametrize(
    ("action", "greeting"), [("tempfail", TEMPFAIL_TEXT), ("accept", "220 mx.relay.test")]
)
async def test_down_milter(relay_server: ServerFactory, tmp_path: Path, action, greeting):
    h = await start(
        relay_server, tmp_path, f"inet:127.0.0.1:{closed_port()}", default_action=action
    )
    c = await session(h)
    assert (await c.read_reply()).split("\n")[-1].startswith(greeting)
    if action == "accept":
        await c.command("EHLO client.test")
        assert (await transaction(c)).startswith("250 2.0.0 Ok: queued as ")


async def test_milter_hanging_in_the_body_tempfails_the_message(
    relay_server: ServerFactory, tmp_path: Path, milter: ScriptedMilter
):
    milter.hang_on = m.BODY
    # Each body chunk before the hang is answered within the timeout (loaded machine: 1 s).
    h = await start(relay_server, tmp_path, await milter.start(), command_timeout=1.0)
    c = await session(h)
    await c.greet()
    big = MESSAGE + (b"y" * 998 + b"\r\n") * 2000  # 2 MB: body chunks while DATA streams
    assert await transaction(c, big) == TEMPFAIL_TEXT
    await h.queue.settle()  # the refused file is removed in the background
    assert h.queued() == [] and os.listdir(h.queue.directory / INCOMING) == []
    assert await c.command("NOOP") == "250 2.0.0 Ok"  # the session is alive


async def test_rspamd_in_the_session(relay_server: ServerFactory, tmp_path: Path):
    if not have("rspamd"):
        pytest.skip("rspamd is not installed (hack/setup.sh installs it)")
    with rspamd(tmp_path / "rspamd") as address:
        h = await start(relay_server, tmp_path, address)
        c = await session(h)
        await c.greet()
        answer = await transaction(c, b"Subject: " + REJECT_MARKER.encode() + b"\r\n\r\nhi\r\n")
        assert answer == "554 5.7.1 Spam message rejected"
        assert (await transaction(c)).startswith("250 2.0.0 Ok: queued as ")
        await c.command("QUIT")
    [data] = h.queued()
    assert b"\r\nX-Spamd-Result: default: False" in data


async def test_opendkim_signs_in_the_session(relay_server: ServerFactory, tmp_path: Path):
    if not have("opendkim") or not have("opendkim-genkey"):
        pytest.skip("opendkim is not installed (hack/setup.sh installs it)")
    key, _ = dkim_key(tmp_path / "keys", "client.test", "sel")
    settings = {
        "Mode": "s",
        "Domain": "client.test",
        "Selector": "sel",
        "KeyFile": str(key),
        "InternalHosts": "127.0.0.0/8",
    }
    with opendkim(tmp_path / "opendkim", settings) as address:
        h = await start(relay_server, tmp_path, address)
        c = await session(h)
        await c.greet()
        assert (await transaction(c)).startswith("250 2.0.0 Ok: queued as ")
        await c.command("QUIT")
    [data] = h.queued()
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=client.test;")
    assert b"\r\nReceived: from client.test" in data
