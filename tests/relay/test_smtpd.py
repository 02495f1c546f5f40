"""The SMTP server with real TCP clients on 127.0.0.x and the real queue."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from mrtest.peers import RawClient
from mrtest.relayproc import make_certificate, next_loopback

from relay.config import RelayConfig
from relay.queue.format import QueueError
from relay.queue.incoming import IncomingMessage
from relay.queue.store import Queue
from relay.smtpd import content
from relay.smtpd.server import HARD_ERROR_LIMIT
from relay.smtpd.session import Reply, ScreenResult, Session

from .conftest import Harness, ServerFactory, make_config

pytestmark = pytest.mark.asyncio


async def client(h: Harness, local: str | None = None) -> RawClient:
    c = RawClient(h.host, h.port, local=local or next_loopback(), timeout=10)
    await c.__aenter__()
    return c


async def send_mail(
    c: RawClient,
    rcpts: list[str],
    body: bytes = b"Subject: t\r\n\r\nhello\r\n",
    sender: str = "a@client.test",
) -> str:
    assert (await c.command(f"MAIL FROM:<{sender}>")).startswith("250")
    for r in rcpts:
        assert (await c.command(f"RCPT TO:<{r}>")).startswith("250"), r
    assert (await c.command("DATA")).startswith("354")
    await c.send(body + b".\r\n")
    return await c.read_reply()


async def test_banner_and_capabilities(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    assert (await c.read_reply()).split("\n")[-1] == "220 mx.relay.test ESMTP mailrelay"
    ehlo = (await c.command("EHLO client.test")).split("\n")
    assert ehlo == [
        "250-mx.relay.test",
        "250-PIPELINING",
        "250-SIZE 25600000",
        "250-ENHANCEDSTATUSCODES",
        "250-8BITMIME",
        "250-DSN",
        "250 SMTPUTF8",
    ]
    assert (
        await c.command("AUTH PLAIN AGZvbwBiYXI=") == "503 5.5.1 Error: authentication not enabled"
    )
    assert await c.command("STARTTLS") == "502 5.5.1 Error: command not implemented"
    assert await c.command("VRFY info@example.com") == "502 5.5.1 VRFY command is disabled"
    assert await c.command("HELP") == "502 5.5.2 Error: command not recognized"
    assert await c.command("NOOP") == "250 2.0.0 Ok"
    assert await c.command("QUIT") == "221 2.0.0 Bye"
    assert await c.closed()


async def test_message_is_queued_with_received_header(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h, "127.0.0.2")
    await c.greet()
    reply = await send_mail(c, ["info@example.com"], b"Subject: t\r\n\r\n..dot\r\nbody\r\n")
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    [data] = h.queued()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"Received: from client.test (unknown [127.0.0.2])\r\n")
    assert f"by mx.relay.test (mailrelay) with ESMTP id {queue_id}".encode() in head
    assert b"for <info@example.com>;" in head
    assert body == b".dot\r\nbody\r\n"


async def test_session_commands_out_of_order(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.read_reply()
    assert await c.command("MAIL FROM:<a@b.test>") == "503 5.5.1 Error: send HELO/EHLO first"
    assert await c.command("HELO client.test") == "250 mx.relay.test"
    assert await c.command("RCPT TO:<info@example.com>") == "503 5.5.1 Error: need MAIL command"
    assert await c.command("DATA") == "503 5.5.1 Error: need MAIL command"
    assert await c.command("MAIL FROM:<a@b.test>") == "250 2.1.0 Ok"
    assert await c.command("MAIL FROM:<a@b.test>") == "503 5.5.1 Error: nested MAIL command"
    assert await c.command("DATA") == "554 5.5.1 Error: no valid recipients"
    assert await c.command("RSET") == "250 2.0.0 Ok"
    assert (
        await c.command("MAIL FROM:<a@b.test> SIZE=10") == "501 5.5.4 Syntax: MAIL FROM:<address>"
    )
    assert await c.command("MAIL FROM:<a b@b.test>") == "501 5.1.7 Bad sender address syntax"
    assert await c.command("MAIL FROM:<>") == "250 2.1.0 Ok"
    assert await c.command("RCPT TO:<>") == "501 5.1.3 Bad recipient address syntax"
    assert (
        await c.command("RCPT TO:<info@example.com> NOTIFY=NEVER")
        == "501 5.5.4 Syntax: RCPT TO:<address>"
    )


# nmap smtp-open-relay.nse: 16 MAIL/RCPT combinations, with domain = a foreign
# domain, srv = our host name, ip = our address; and the same tricks aimed at a
# relay domain of ours, where only routing could make them go elsewhere.
def open_relay_vectors(ip: str) -> list[tuple[str, str]]:
    domain, srv = "evil.test", "mx.relay.test"
    senders = ["<>", f"<relaytest@{domain}>", f"<relaytest@[{ip}]>"]
    rcpts = [
        f"relaytest@{domain}",
        f"relaytest%{domain}@[{ip}]",
        f"relaytest%{domain}@{srv}",
        f'"relaytest@{domain}"',
        f'"relaytest%{domain}"',
        f"relaytest@{domain}@[{ip}]",
        f'"relaytest@{domain}"@[{ip}]',
        f"relaytest@{domain}@{srv}",
        f"@[{ip}]:relaytest@{domain}",
        f"@{srv}:relaytest@{domain}",
        f"{domain}!relaytest",
        f"{domain}!relaytest@[{ip}]",
        f"{domain}!relaytest@{srv}",
        # the same, behind one of our relay domains
        f"relaytest%{domain}@example.org",
        f'"relaytest@{domain}"@example.org',
        f'"relaytest%{domain}"@example.org',
        f'"{domain}!relaytest"@example.org',
        f"relaytest@{domain}@example.org",
        f"@example.org:relaytest@{domain}",
        f"@example.org,@{srv}:relaytest@example.org",
        f"{domain}!relaytest@example.org",
        # IP literals, ours included
        f"postmaster@[{ip}]",
        "postmaster@[127.0.0.1]",
        "postmaster@[IPv6:::1]",
        # no domain at all
        "postmaster",
    ]
    nmap = [(s, r) for s in senders for r in rcpts[:1]] + [(senders[1], r) for r in rcpts]
    return nmap + [(senders[0], r) for r in rcpts[1:13]] + [(senders[2], r) for r in rcpts[1:13]]


@pytest.mark.parametrize("trusted", [False, True])
async def test_every_open_relay_vector_is_refused(
    trusted: bool, tmp_path: Path, relay_server: ServerFactory
) -> None:
    # Even a trusted (mynetworks) client may only relay to relay domains.
    mynetworks = ["127.0.0.0/8"] if trusted else []
    h = await relay_server(make_config(tmp_path, spec={"network": {"mynetworks": mynetworks}}))
    vectors = open_relay_vectors(h.host)
    assert len(vectors) > 40
    for i, (sender, rcpt) in enumerate(vectors):
        if i % 10 == 0:  # rejects count as errors (Postfix): a new session in time
            c = await client(h)
            await c.greet()
        assert (await c.command(f"MAIL FROM:{sender}")).startswith("250"), sender
        reply = await c.command(f"RCPT TO:<{rcpt}>")
        assert reply == f"554 5.7.1 <{rcpt}>: Relay access denied", (sender, rcpt)
        assert await c.command("RSET") == "250 2.0.0 Ok"
    assert h.queued() == []


async def test_recipient_tables(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    assert await c.command("MAIL FROM:<a@client.test>") == "250 2.1.0 Ok"
    assert await c.command("RCPT TO:<INFO@Example.COM>") == "250 2.1.5 Ok"
    assert await c.command("RCPT TO:<joe@example.com.>") == "250 2.1.5 Ok"
    assert await c.command("RCPT TO:<nobody@example.com>") == (
        "550 5.1.1 <nobody@example.com>: Recipient address rejected: "
        "User unknown in relay recipient table"
    )
    assert await c.command("RCPT TO:<anyone@EXAMPLE.org>") == "250 2.1.5 Ok"
    assert await c.command("RCPT TO:<x@sub.example.org>") == (
        "554 5.7.1 <x@sub.example.org>: Relay access denied"
    )


async def test_too_many_recipients(tmp_path: Path, relay_server: ServerFactory) -> None:
    h = await relay_server(make_config(tmp_path, spec={"limits": {"recipientsPerMessage": 2}}))
    c = await client(h)
    await c.greet()
    await c.command("MAIL FROM:<a@client.test>")
    assert await c.command("RCPT TO:<a@example.org>") == "250 2.1.5 Ok"
    assert await c.command("RCPT TO:<b@example.org>") == "250 2.1.5 Ok"
    assert await c.command("RCPT TO:<c@example.org>") == "452 4.5.3 Error: too many recipients"


async def test_message_size_limits(tmp_path: Path, relay_server: ServerFactory) -> None:
    h = await relay_server(make_config(tmp_path, spec={"limits": {"messageSize": 2000}}))
    c = await client(h)
    ehlo = await c.greet()
    assert "250-SIZE 2000" in ehlo
    assert await c.command("MAIL FROM:<a@client.test> SIZE=2001") == (
        "552 5.3.4 Message size exceeds fixed limit"
    )
    reply = await send_mail(c, ["a@example.org"], b"x" * 80 + b"\r\n" + (b"y" * 78 + b"\r\n") * 40)
    assert reply == "552 5.3.4 Error: message file too big"
    # The session goes on, and a message within the limit is accepted.
    assert (await send_mail(c, ["a@example.org"])).startswith("250 2.0.0 Ok: queued as")
    assert len(h.queued()) == 1


async def test_long_lines_are_accepted_as_they_are(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    long_line = b"z" * 5000
    reply = await send_mail(c, ["a@example.org"], b"Subject: long\r\n\r\n" + long_line + b"\r\n")
    assert reply.startswith("250 ")
    assert h.queued()[0].endswith(b"\r\n\r\n" + long_line + b"\r\n")


SMUGGLING = [
    b"\r\n.\r",
    b"\r\n\x00.\r\n",
    b"\r\n\x00.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\n\n.\r\n",
    b"\n.\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\n.\r",
    b"\r\n.\r\r\n",
]


@pytest.mark.parametrize("variant", SMUGGLING, ids=repr)
async def test_smuggling_yields_one_message(variant: bytes, relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    smuggled = (
        b"MAIL FROM:<admin@example.com>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nevil\r\n"
    )
    await c.command("MAIL FROM:<a@client.test>")
    await c.command("RCPT TO:<info@example.com>")
    assert (await c.command("DATA")).startswith("354")
    # All in one write, as the attack does it.
    await c.send(b"Subject: first\r\n\r\nfirst" + variant + smuggled + b".\r\nQUIT\r\n")
    assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued as")
    assert await c.read_reply() == "221 2.0.0 Bye"
    [data] = h.queued()
    assert b"MAIL FROM:<admin@example.com>" in data
    # Nothing bare goes to the queue, so nothing bare goes to the next hop.
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")


async def test_pipelining(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    await c.send(
        b"MAIL FROM:<a@client.test>\r\nRCPT TO:<info@example.com>\r\n"
        b"RCPT TO:<x@evil.test>\r\nDATA\r\n"
    )
    assert await c.read_reply() == "250 2.1.0 Ok"
    assert await c.read_reply() == "250 2.1.5 Ok"
    assert (await c.read_reply()).startswith("554 5.7.1")
    assert (await c.read_reply()).startswith("354")
    await c.send(b"Subject: p\r\n\r\nx\r\n.\r\nMAIL FROM:<b@client.test>\r\nQUIT\r\n")
    assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued")
    assert await c.read_reply() == "250 2.1.0 Ok"
    assert await c.read_reply() == "221 2.0.0 Bye"


async def test_a_command_split_across_reads(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    for part in (b"MAIL FROM:<a@cli", b"ent.test>\r", b"\nRCPT TO:<info@exam", b"ple.com>\r\n"):
        await c.send(part)
        await asyncio.sleep(0.02)  # each part its own read on the server
    assert await c.read_reply() == "250 2.1.0 Ok"
    assert await c.read_reply() == "250 2.1.5 Ok"
    await c.send(b"DATA\r\n")
    assert (await c.read_reply()).startswith("354")
    # The final dot split from its CRLF; input after it in the same read.
    await c.send(b"Subject: s\r\n\r\nx\r\n.")
    await asyncio.sleep(0.02)
    await c.send(b"\r\nNOOP\r\n")
    assert (await c.read_reply()).startswith("250 2.0.0 Ok: queued")
    assert await c.read_reply() == "250 2.0.0 Ok"
    assert len(h.queued()) == 1


async def test_eof_with_a_partial_line_ends_the_session(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    assert len(h.ctx.sessions) == 1
    await c.send(b"NOOP\r\nQU")
    assert c.writer is not None
    c.writer.write_eof()  # half-closed, with a command cut off
    assert await c.read_reply() == "250 2.0.0 Ok"
    assert await c.closed()
    for _ in range(100):
        if not h.ctx.sessions:
            break
        await asyncio.sleep(0.01)
    assert not h.ctx.sessions


async def test_unauth_pipelining_is_rejected(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.read_reply()
    # A client that talks without waiting for the EHLO reply.
    await c.send(b"EHLO spam.test\r\nMAIL FROM:<a@spam.test>\r\nRCPT TO:<info@example.com>\r\n")
    assert (await c.read_reply()).startswith("250-mx.relay.test")
    assert await c.read_reply() == "250 2.1.0 Ok"
    assert await c.read_reply() == (
        "503 5.5.0 <info@example.com>: Recipient address rejected: "
        "Improper use of SMTP command pipelining"
    )


async def test_too_many_errors(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    for _ in range(HARD_ERROR_LIMIT):
        assert (await c.command("BOGUS")).startswith("502 5.5.2")
    assert await c.command("NOOP") == "421 4.7.0 mx.relay.test Error: too many errors"
    assert await c.closed()


async def test_idle_timeout(relay_server: ServerFactory) -> None:
    h = await relay_server(idle_timeout=0.2)
    c = await client(h)
    await c.greet()
    assert await c.read_reply() == "421 4.4.2 mx.relay.test Error: timeout exceeded"
    assert await c.closed()


async def test_command_line_limit_and_forbidden_commands(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    assert await c.command("NOOP " + "x" * 100_000) == "500 5.5.2 Error: line too long"
    assert await c.command("NOOP") == "250 2.0.0 Ok"
    assert await c.command("GET / HTTP/1.0") == "521 5.7.0 Error: I can break rules, too. Goodbye."
    assert await c.closed()


def tls_context(tmp_path: Path) -> ssl.SSLContext:
    certs = make_certificate(tmp_path / "tls")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "tls.crt", certs / "tls.key")
    return ctx


def client_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.mark.every_event_loop  # STARTTLS re-points the transport
async def test_starttls(tmp_path: Path, relay_server: ServerFactory) -> None:
    h = await relay_server(tls_context=tls_context(tmp_path))
    c = await client(h, "127.0.0.2")
    assert "250-STARTTLS" in await c.greet()
    assert await c.command("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert c.writer is not None
    await c.writer.start_tls(client_tls())
    # RFC 3207: the session starts over; STARTTLS is not offered again.
    assert await c.command("MAIL FROM:<a@client.test>") == "503 5.5.1 Error: send HELO/EHLO first"
    ehlo = await c.command("EHLO client.test")
    assert "STARTTLS" not in ehlo and "AUTH" not in ehlo
    assert await c.command("STARTTLS") == "554 5.5.1 Error: TLS already active"
    assert (await send_mail(c, ["a@example.org"])).startswith("250 2.0.0 Ok: queued")
    assert b"with ESMTPS id" in h.queued()[0]


@pytest.mark.every_event_loop  # STARTTLS re-points the transport
async def test_starttls_plaintext_injection_is_discarded(
    tmp_path: Path, relay_server: ServerFactory
) -> None:
    h = await relay_server(tls_context=tls_context(tmp_path))
    c = await client(h)
    await c.greet()
    # CVE-2011-0411 / CVE-2024-34083: commands sent in plaintext right after
    # STARTTLS must not be run inside the TLS session.
    await c.send(b"STARTTLS\r\nEHLO injected.test\r\n")
    assert await c.read_reply() == "220 2.0.0 Ready to start TLS"
    assert c.writer is not None
    await c.writer.start_tls(client_tls())
    assert await c.command("NOOP") == "250 2.0.0 Ok"
    assert await c.command("MAIL FROM:<a@client.test>") == "503 5.5.1 Error: send HELO/EHLO first"


class FailingIncoming(IncomingMessage):
    async def commit(self, sender: str, recipients: list[str], client: str = "") -> str:
        raise QueueError("No space left on device")


class FailingQueue(Queue):
    def incoming(self) -> IncomingMessage:
        return FailingIncoming(self, "FAILING00000")


async def test_queue_failure_never_answers_250(tmp_path: Path, relay_server: ServerFactory) -> None:
    h = await relay_server(queue=FailingQueue(tmp_path / "failing"))
    c = await client(h)
    await c.greet()
    assert await send_mail(c, ["a@example.org"]) == "451 4.3.0 Error: queue file write error"
    assert h.queued() == []


async def test_content_reject(relay_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bytes] = []

    class Rejecting:
        """Stands in for the attachment filter, fed during DATA."""

        done = False

        def feed_inline(self, data: bytes) -> None:
            seen.append(data)

        async def feed(self, data: bytes) -> None:
            seen.append(data)

        def verdict(self) -> Reply | None:
            return Reply(550, "5.7.1", "message content rejected")

    monkeypatch.setattr(content, "content_check", lambda config: Rejecting())
    h = await relay_server()
    c = await client(h)
    await c.greet()
    assert await send_mail(c, ["a@example.org"]) == "550 5.7.1 message content rejected"
    assert h.queued() == []
    # The check saw the whole message as it would be queued.
    fed = b"".join(seen)
    assert fed.startswith(b"Received: ") and fed.endswith(b"hello\r\n")


class ScriptedScreen:
    def __init__(self, result: ScreenResult) -> None:
        self.result = result

    def update_config(self, config: RelayConfig) -> None:
        pass

    async def screen(self, session: Session, client: Any) -> ScreenResult:
        return self.result


async def test_postscreen_drop(relay_server: ServerFactory) -> None:
    reply = Reply(521, "5.5.1", "Protocol error", disconnect=True)
    h = await relay_server(postscreen=ScriptedScreen(ScreenResult("drop", "pregreet", reply)))
    c = await client(h)
    assert await c.read_reply() == "521 5.5.1 Protocol error"
    assert await c.closed()


async def test_postscreen_enforce(relay_server: ServerFactory) -> None:
    reply = Reply(550, "5.7.1", "Service unavailable; client [127.0.0.9] blocked using bl.test")
    h = await relay_server(postscreen=ScriptedScreen(ScreenResult("enforce", "dnsbl", reply)))
    c = await client(h)
    await c.greet()
    assert await c.command("MAIL FROM:<a@client.test>") == "250 2.1.0 Ok"
    assert await c.command("RCPT TO:<info@example.com>") == str(reply)
    assert await c.command("DATA") == "554 5.5.1 Error: no valid recipients"
    assert await c.closed()


async def test_shutdown_tells_idle_sessions(relay_server: ServerFactory) -> None:
    h = await relay_server()
    idle = await client(h)
    await idle.greet()
    busy = await client(h)
    await busy.greet()
    await busy.command("MAIL FROM:<a@client.test>")
    await busy.command("RCPT TO:<a@example.org>")
    h.ctx.begin_shutdown()
    assert await idle.read_reply() == (
        "421 4.3.2 mx.relay.test Service shutting down, closing connection"
    )
    assert await idle.closed()
    # A transaction under way finishes; then the session is closed.
    assert (await busy.command("DATA")).startswith("354")
    await busy.send(b"Subject: x\r\n\r\nx\r\n.\r\n")
    assert (await busy.read_reply()).startswith("250 2.0.0 Ok: queued")
    assert (await busy.read_reply()).startswith("421 4.3.2")
    assert await busy.closed()


async def test_config_update_applies_to_new_transactions(
    tmp_path: Path, relay_server: ServerFactory
) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    await c.command("MAIL FROM:<a@client.test>")
    assert (await c.command("RCPT TO:<a@example.net>")).startswith("554 5.7.1")
    await c.command("RSET")
    h.ctx.update_config(make_config(tmp_path, domains={"example.net": "any"}, name="second"))
    await c.command("MAIL FROM:<a@client.test>")
    assert await c.command("RCPT TO:<a@example.net>") == "250 2.1.5 Ok"


async def test_many_concurrent_sessions(relay_server: ServerFactory) -> None:
    h = await relay_server()

    async def one(i: int) -> str:
        c = await client(h, f"127.0.0.{20 + i}")
        try:
            await c.greet()
            return await send_mail(c, [f"user{i}@example.org"])
        finally:
            await c.__aexit__(None, None, None)

    replies = await asyncio.gather(*(one(i) for i in range(20)))
    assert all(r.startswith("250 2.0.0 Ok: queued as") for r in replies)
    assert len({r.rsplit(" ", 1)[1] for r in replies}) == 20
    assert len(h.queued()) == 20


async def test_big_message_streams_to_the_queue(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    line = b"0123456789" * 7 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 80_000  # 5.8 MB
    assert (await send_mail(c, ["a@example.org"], body)).startswith("250 2.0.0 Ok: queued")
    [data] = h.queued()
    assert data.endswith(b"\r\n\r\n" + line * 80_000)


async def test_error_count_restarts_after_a_message(relay_server: ServerFactory) -> None:
    h = await relay_server()
    c = await client(h)
    await c.greet()
    for _ in range(HARD_ERROR_LIMIT - 1):
        assert (await c.command("BOGUS")).startswith("502")
    assert (await send_mail(c, ["a@example.org"])).startswith("250 2.0.0 Ok: queued")
    for _ in range(HARD_ERROR_LIMIT - 1):
        assert (await c.command("BOGUS")).startswith("502")
    assert await c.command("NOOP") == "250 2.0.0 Ok"


async def test_data_trickle_is_cut_off(relay_server: ServerFactory) -> None:
    """A client trickling DATA far below smtpd_min_data_rate gets the timeout,
    although it never stays silent for a whole idle timeout."""
    h = await relay_server(idle_timeout=0.5)
    c = await client(h)
    await c.greet()
    assert (await c.command("EHLO trickle.test")).startswith("250")
    assert (await c.command("MAIL FROM:<a@client.test>")).startswith("250")
    assert (await c.command("RCPT TO:<info@example.com>")).startswith("250")
    assert (await c.command("DATA")).startswith("354")
    assert c.writer is not None and c.reader is not None
    buffered: bytearray = c.reader._buffer  # type: ignore[attr-defined]
    for _ in range(200):  # at most 20 s of trickling; the cut comes after about 0.5 s
        try:
            c.writer.write(b"x")
            await c.writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
        if buffered:
            break
    # Read from the buffer: an "x" sent after the relay closed draws a reset,
    # which the reader raises before the reply it holds.
    await asyncio.sleep(0.1)
    assert bytes(buffered) == b"421 4.4.2 mx.relay.test Error: timeout exceeded\r\n"
    assert h.queued() == []
