"""Outbound PIPELINING: MAIL, RCPTs and DATA in one write, replies read in
order; per-recipient results as without pipelining, connections reused, and
the pool never out of step with the server. Against a scripted server (that
offers PIPELINING, unlike aiosmtpd) and against Postfix's smtp-sink."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from mrtest.delivery_helpers import free_port

from relay.config import NextHop
from relay.delivery.connections import ConnectionPool
from relay.delivery.transaction import BOUNCED, DEFERRED, SENT
from relay.dns import Resolver

HOST = "127.0.0.7"
# relay.delivery.replies borrows the transport: asyncio's or uvloop's.
pytestmark = pytest.mark.every_event_loop


@dataclass
class Script:
    """Replies of the scripted next hop (defaults: accept everything)."""

    mail: str = "250 2.1.0 Ok"
    rcpt: dict[str, str] = field(default_factory=dict)  # address -> reply
    data: str = "354 End data with <CR><LF>.<CR><LF>"
    final: str = "250-2.0.0 Ok: queued\r\n250 2.0.0 as X1"  # multi-line on purpose
    drop_after_mail: int = 0  # close the connection before the MAIL reply N times
    offer_pipelining: bool = True


@dataclass
class Server:
    script: Script
    port: int = 0
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    connections: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> Server:
        self.server = await asyncio.start_server(self._session, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1

        def say(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        say("220 scripted ESMTP")
        try:
            while line := await reader.readline():
                command = line.decode().strip()
                self.commands.append(command)
                s = self.script  # the test may swap it between messages
                verb = command.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    say(
                        "250-scripted\r\n250-8BITMIME"
                        + ("\r\n250 PIPELINING" if s.offer_pipelining else "\r\n250 SIZE")
                    )
                elif verb == "MAIL":
                    if s.drop_after_mail > 0:
                        s.drop_after_mail -= 1
                        writer.close()
                        return
                    say(s.mail)
                elif verb == "RCPT":
                    address = command.split("<", 1)[1].rstrip(">")
                    say(s.rcpt.get(address, "250 2.1.5 Ok"))
                elif verb == "DATA":
                    say(s.data)
                    if s.data.startswith("354"):
                        lines = []
                        while (data_line := await reader.readline()) != b".\r\n":
                            if not data_line:
                                return
                            lines.append(data_line)
                        self.messages.append(b"".join(lines) + b".\r\n")
                        say(s.final)
                elif verb == "RSET":
                    say("250 2.0.0 Ok")
                elif verb == "QUIT":
                    say("221 2.0.0 Bye")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    say("502 5.5.2 Error: command not recognized")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Script], asyncio.Future[Server]]]:
    servers: list[Server] = []

    async def make(script: Script) -> Server:
        server = await Server(script).start()
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for s in servers:
        await s.stop()


def chunks_of(data: bytes, size: int = 65536) -> Callable[[], AsyncIterator[bytes]]:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    return chunks


MESSAGE = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"


async def deliver(pool: ConnectionPool, port: int, rcpts: list[str], data: bytes = MESSAGE) -> list:
    hop = NextHop(HOST, port, tls="none")
    return await pool.deliver(
        hop, "a@example.org", rcpts, chunks_of(data), local_hostname="relay.test"
    )


async def test_one_write_group_and_per_recipient_results(scripted: Callable) -> None:
    server = await scripted(Script(rcpt={"no@example.com": "550 5.1.1 <no@example.com>: unknown"}))
    pool = ConnectionPool(Resolver())
    try:
        results = await deliver(pool, server.port, ["ok@example.com", "no@example.com"])
        assert [(r.recipient, r.kind) for r in results] == [
            ("ok@example.com", SENT),
            ("no@example.com", BOUNCED),
        ]
        assert results[0].reply == "250 2.0.0 Ok: queued\n2.0.0 as X1"
        assert results[1].in_reply_to == "RCPT TO" and results[1].status == "5.1.1"
        assert server.messages == [MESSAGE.replace(b"\r\n.", b"\r\n..") + b".\r\n"]
        # The connection is reused, in step: a second message on it.
        results = await deliver(pool, server.port, ["ok@example.com"])
        assert results[0].kind == SENT and server.connections == 1
        assert [c.split(" ")[0] for c in server.commands] == [
            "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "MAIL", "RCPT", "DATA",
        ]  # fmt: skip
    finally:
        await pool.close()


async def test_refusals_at_each_stage(scripted: Callable) -> None:
    no_mail = Script(mail="553 5.7.1 sender rejected", data="503 5.5.1 need MAIL")
    busy = Script(rcpt={"ok@example.com": "450 4.2.1 busy"}, data="554 5.5.1 no valid recipients")
    cases = [
        (no_mail, BOUNCED, "MAIL FROM"),
        (busy, DEFERRED, "RCPT TO"),
        (Script(data="451 4.3.0 try later"), DEFERRED, "DATA"),
        (Script(final="552 5.3.4 too big"), BOUNCED, "end of DATA"),
    ]
    for script, kind, stage in cases:
        server = await scripted(script)
        pool = ConnectionPool(Resolver())
        try:
            [result] = await deliver(pool, server.port, ["ok@example.com"])
            assert (result.kind, result.in_reply_to) == (kind, stage), (script, result)
            # A failed transaction is reset, and the connection stays usable.
            assert server.commands[-1] == "RSET"
            server.script = Script()
            [again] = await deliver(pool, server.port, ["ok@example.com"])
            assert again.kind == SENT and server.connections == 1
        finally:
            await pool.close()


async def test_data_accepted_without_recipients_is_ended_empty(scripted: Callable) -> None:
    server = await scripted(
        Script(rcpt={"no@example.com": "550 5.1.1 unknown"}, final="554 5.5.1 no valid recipients")
    )
    pool = ConnectionPool(Resolver())
    try:
        [result] = await deliver(pool, server.port, ["no@example.com"])
        assert (result.kind, result.in_reply_to) == (BOUNCED, "RCPT TO")
        assert server.messages == [b".\r\n"]  # no message content for nobody
        server.script = Script()
        [again] = await deliver(pool, server.port, ["ok@example.com"])
        assert again.kind == SENT and server.connections == 1
    finally:
        await pool.close()


async def test_a_reused_connection_closed_by_the_peer_is_retried(scripted: Callable) -> None:
    server = await scripted(Script())
    pool = ConnectionPool(Resolver())
    try:
        assert (await deliver(pool, server.port, ["ok@example.com"]))[0].kind == SENT
        server.script.drop_after_mail = 1  # the idle connection dies under us
        [result] = await deliver(pool, server.port, ["ok@example.com"])
        assert result.kind == SENT and server.connections == 2
        server.script.drop_after_mail = 5  # a fresh connection failing is a deferral
        pool2 = ConnectionPool(Resolver())
        try:
            [result] = await deliver(pool2, server.port, ["ok@example.com"])
            assert result.kind == DEFERRED and "lost connection" in result.reply
        finally:
            await pool2.close()
    finally:
        await pool.close()


async def test_a_next_hop_that_stops_answering_times_out(scripted: Callable) -> None:
    """Silent after MAIL, or silent in the middle of a multi-line reply to the
    final dot: deferred as timed out, and the connection is not reused."""
    server = await scripted(Script(mail="250-2.1.0 half a reply", offer_pipelining=False))
    pool = ConnectionPool(Resolver(), command_timeout=0.2)
    try:
        [result] = await deliver(pool, server.port, ["ok@example.com"])
        assert result.kind == DEFERRED and "timed out" in result.reply
        assert result.reply.endswith("while sending MAIL FROM: no reply in time")
        server.script = Script(final="250-2.0.0 Ok: queued")
        [result] = await deliver(pool, server.port, ["ok@example.com"])
        assert result.kind == DEFERRED and "while sending end of DATA" in result.reply
        assert server.connections == 2
        [result] = await deliver(pool, server.port, ["ok@example.com"])
        assert result.kind == DEFERRED and server.connections == 3
    finally:
        await pool.close()


async def test_big_message_streams_through(scripted: Callable) -> None:
    server = await scripted(Script())
    pool = ConnectionPool(Resolver())
    body = b"".join(
        b"line %07d ...........................................\r\n" % i for i in range(60_000)
    )
    try:
        [result] = await deliver(
            pool, server.port, ["ok@example.com"], b"Subject: big\r\n\r\n" + body
        )
        assert result.kind == SENT
        assert server.messages[0] == b"Subject: big\r\n\r\n" + body + b".\r\n"
    finally:
        await pool.close()


async def test_without_the_extension_commands_go_one_by_one(scripted: Callable) -> None:
    server = await scripted(Script(offer_pipelining=False))
    pool = ConnectionPool(Resolver())
    try:
        [result] = await deliver(pool, server.port, ["ok@example.com"])
        assert result.kind == SENT
    finally:
        await pool.close()


@pytest.mark.skipif(not shutil.which("smtp-sink"), reason="Postfix's smtp-sink is not installed")
async def test_against_postfix_smtp_sink() -> None:
    port = free_port(HOST)
    user = ["-u", "nobody"] if os.geteuid() == 0 else []  # smtp-sink will not run as root
    sink = subprocess.Popen(
        ["smtp-sink", *user, f"{HOST}:{port}", "16"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pool = ConnectionPool(Resolver())
    try:
        for _ in range(1200):  # up to 60 s: smtp-sink starts slowly on a loaded machine
            try:
                _, w = await asyncio.open_connection(HOST, port)
                w.close()
                break
            except OSError:
                assert sink.poll() is None, "smtp-sink did not start"
                await asyncio.sleep(0.05)
        for _ in range(20):
            results = await deliver(pool, port, ["a@example.com", "b@example.com"])
            assert [r.kind for r in results] == [SENT, SENT], results
    finally:
        await pool.close()
        sink.terminate()
        sink.wait(5)
