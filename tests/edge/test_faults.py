"""Faults: the relay SIGKILLed while mail flows, a next hop that refuses,
stalls, drops mid-DATA or answers 4xx then 5xx, a full disk, a dead or slow
DNS server. Every acknowledged message is delivered or returned; nothing is
acknowledged that was not stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mrtest.delivery_helpers import FakeClock, Sink, free_port, message
from mrtest.dnsserver import DnsServer
from mrtest.edgeserver import edge_config, long_test
from mrtest.faults import KillRun, RestartableRelay, small_tmpfs
from mrtest.peers import AiosmtpdSink, RawClient
from mrtest.relayproc import next_loopback, write_manifests

from relay.config import Domain, NextHop, QueuePolicy, RelayConfig
from relay.delivery.qmgr import Delivery
from relay.dns import Resolver
from relay.queue.store import Queue

log = logging.getLogger("edge.faults")


# -- SIGKILL while sending ----------------------------------------------------------------


def kill_run(tmp_path: Path, messages: int, kills: int, seed: int) -> Any:
    with AiosmtpdSink(next_loopback()) as sink:
        manifests = write_manifests(
            tmp_path / "m", next_hop=sink.address, domains={"example.org": "any"}
        )
        relay = RestartableRelay(manifests, tmp_path / "relay", workers=1)
        relay.start()
        try:
            report = KillRun(relay, sink, messages=messages, kills=kills, seed=seed).run()
        finally:
            relay.stop()
    print(f"\nSIGKILL run (seed {seed}): {report.summary()}")
    (tmp_path / "report.txt").write_text(report.summary() + "\n")
    return report


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_loses_no_acknowledged_message(tmp_path: Path, seed: int) -> None:
    report = kill_run(tmp_path, messages=150, kills=4, seed=seed)
    assert report.kills == 4
    assert len(report.acknowledged) == 150
    assert report.lost == set(), report.summary()


@long_test
@pytest.mark.parametrize("seed", range(10, 15))
def test_sigkill_long(tmp_path: Path, seed: int) -> None:
    report = kill_run(tmp_path, messages=1000, kills=20, seed=seed)
    assert report.lost == set(), report.summary()
    with open(os.environ.get("MAILRELAY_REPORT", "/dev/null"), "a") as f:
        f.write(f"sigkill seed={seed} {report.summary()}\n")


# -- next hop faults (in-process delivery, injected clock) ----------------------------------


class FaultyNextHop:
    """A next hop that misbehaves on purpose: `mode` is one of
    silent (accepts, never says anything), drop_in_data (closes after 354
    and some data), or ok (a real aiosmtpd sink takes over)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.mode = "silent"
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> FaultyNextHop:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.mode == "silent":
                await reader.read()  # until the client gives up
                return
            writer.write(b"220 faulty.test ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250 faulty.test\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    await reader.read(10)  # a little of the message, then gone
                    return
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def delivery_for(tmp_path: Path, hop: NextHop, home: Sink, **delivery_kw: Any) -> Any:
    clock = FakeClock()
    config = RelayConfig(
        name="t",
        hostname="relay.test",
        domains={
            "example.com": Domain("example.com", hop, "any"),
            "example.org": Domain("example.org", NextHop(home.host, home.port, tls="none"), "any"),
        },
        recipients=set(),
        queue=QueuePolicy(lifetime=86400, min_backoff=300, max_backoff=4000),
    )
    queue = Queue(tmp_path / "queue", clock=clock)
    delivery = Delivery(queue, lambda: config, Resolver(), clock, **delivery_kw)
    await delivery.recover()
    try:
        yield queue, delivery, clock
    finally:
        await delivery.stop(grace=5)
        await queue.close()


async def send_and_attempt(queue: Queue, delivery: Delivery) -> str:
    msg = queue.incoming()
    msg.write(message(mid="fault@client.test"))
    qid = await msg.commit("sender@example.org", ["b@example.com"], "192.0.2.1")
    delivery.wake(qid)
    await delivery.idle()
    return qid


async def retry_now(queue: Queue, delivery: Delivery, clock: FakeClock) -> None:
    [m] = list(queue.messages())
    clock.now = m.next_attempt
    await delivery.process_due()


@pytest.fixture
async def home() -> Any:
    sink = await Sink(host=next_loopback()).start()
    yield sink
    await sink.stop()


async def test_next_hop_refusing_then_back(tmp_path: Path, home: Sink, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    host = next_loopback()
    port = free_port(host)
    async with delivery_for(tmp_path, NextHop(host, port, tls="none"), home) as (q, d, clock):
        await send_and_attempt(q, d)
        assert "Connection refused" in caplog.text and "status=deferred" in caplog.text
        sink = await Sink(host=host, port=port).start()
        try:
            await retry_now(q, d, clock)
            assert [message_id(m.data) for m in sink.messages] == ["<fault@client.test>"]
            assert list(q.messages()) == []
        finally:
            await sink.stop()


def message_id(data: bytes) -> str:
    from mrtest.faults import message_id_of

    return message_id_of(data)


@pytest.mark.parametrize("mode", ["silent", "drop_in_data"])
async def test_next_hop_stalling_or_dropping_mid_data(
    tmp_path: Path, home: Sink, caplog: Any, mode: str
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    faulty = await FaultyNextHop(next_loopback()).start()
    faulty.mode = mode
    hop = NextHop(faulty.host, faulty.port, tls="none")
    try:
        async with delivery_for(tmp_path, hop, home, connect_timeout=0.5, command_timeout=0.5) as (
            q,
            d,
            clock,
        ):
            await send_and_attempt(q, d)
            assert "status=deferred" in caplog.text
            assert faulty.connections >= 1
            assert len(list(q.messages())) == 1  # still here, untouched
            await faulty.stop()
            # The next hop is fixed (a real one now listens on that port).
            sink = await Sink(host=faulty.host, port=faulty.port).start()
            try:
                await retry_now(q, d, clock)
                assert [message_id(m.data) for m in sink.messages] == ["<fault@client.test>"]
                assert list(q.messages()) == []
            finally:
                await sink.stop()
    finally:
        await faulty.stop()
    assert home.messages == []  # no bounce: it was delivered in the end


async def test_next_hop_4xx_then_5xx_returns_the_message(
    tmp_path: Path, home: Sink, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="relay.delivery")
    busy = {"b@example.com": "450 4.2.1 busy"}
    sink = await Sink(host=next_loopback(), rcpt_replies=busy).start()
    hop = NextHop(sink.host, sink.port, tls="none")
    try:
        async with delivery_for(tmp_path, hop, home) as (q, d, clock):
            await send_and_attempt(q, d)
            assert "status=deferred (450 4.2.1 busy)" in caplog.text
            sink.rcpt_replies["b@example.com"] = "550 5.1.1 no such user"
            await retry_now(q, d, clock)
            assert list(q.messages()) == []
    finally:
        await sink.stop()
    assert "status=bounced (550 5.1.1 no such user)" in caplog.text
    [dsn] = home.messages
    assert dsn.recipients == ["sender@example.org"]
    assert b"550 5.1.1 no such user" in dsn.data
    assert sink.messages == []


# -- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-disk", "2m") as folder:
        yield folder


async def test_disk_full_never_acknowledges_what_was_not_stored(
    edge_server: Any, tmp_path: Path, small_disk: Path
) -> None:
    config = edge_config(tmp_path, spec={"limits": {"messageSize": 300_000}})
    edge = await edge_server(config, queue=Queue(small_disk / "queue"))
    body = ("x" * 76 + "\r\n") * 2500  # ~195 kB a message
    replies: list[str] = []
    accepted: list[str] = []
    async with RawClient(*edge.address, local=next_loopback(), timeout=20) as c:
        await c.greet()
        for n in range(20):
            reply = await c.command("MAIL FROM:<a@client.test>")
            replies.append(reply)
            if not reply.startswith("250"):
                await c.command("RSET")
                continue
            assert (await c.command("RCPT TO:<x@example.org>")).startswith("250")
            assert (await c.command("DATA")).startswith("354")
            mid = f"<full{n}@client.test>"
            await c.send(f"Message-Id: {mid}\r\n\r\n{body}".encode())
            reply = await c.command(".")
            replies.append(reply)
            if reply.startswith("250"):
                accepted.append(mid)
            await c.command("RSET")
    codes = [r[:3] for r in replies]
    # The disk filled up: the relay said so (452 at MAIL, 451 after DATA) ...
    assert "452" in codes or "451" in codes, replies
    assert set(codes) <= {"250", "451", "452"}, replies
    # ... and every 250 is a whole message in the queue.
    stored = [message_id(m) for m in edge.queued()]
    assert sorted(stored) == sorted(accepted)
    for m in edge.queued():
        assert m.endswith(body.encode())
    assert 0 < len(accepted) < 20


# -- DNS dead or slow ----------------------------------------------------------------------


class SlowDns(DnsServer):
    """Answers every query, after the relay's DNS timeout."""

    def answer(self, wire: bytes) -> bytes | None:
        time.sleep(1.5)
        return super().answer(wire)


@pytest.mark.parametrize("dns_state", ["dead", "slow"])
async def test_dns_dead_or_slow_defers_and_keeps_serving(
    edge_server: Any, tmp_path: Path, dns_state: str
) -> None:
    """With the reverse-hostname, RBL and SPF checks on and DNS gone (or
    answering after the timeout), sessions are still served: RCPT is deferred
    with a 4xx (never a 5xx for a lookup that failed, never a 250 for a check
    that could not be done), and clients the checks do not apply to (mynetworks)
    go through."""
    friend = next_loopback()
    server = SlowDns({}) if dns_state == "slow" else contextlib.nullcontext()
    with server as dns:
        # dead: a port where nobody answers.
        nameserver = dns.nameserver if dns is not None else f"127.0.0.1:{free_port('127.0.0.1')}"
        spec = {
            "dns": {"nameservers": [nameserver], "timeout": "1s"},
            "network": {"mynetworks": [f"{friend}/32"]},
            "restrictions": {
                "rejectUnknownReverseClientHostname": True,
                # On, it defers even mynetworks mail while DNS is down
                # (defer_if_permit); off here so one client shows mail flowing.
                "rejectUnknownRecipientDomain": False,
                "rblClients": [{"zone": "bl.test"}],
                "spf": {"enabled": True},
            },
        }
        edge = await edge_server(edge_config(tmp_path, spec=spec))

        async def stranger() -> list[str]:
            async with RawClient(*edge.address, local=next_loopback(), timeout=30) as c:
                await c.greet()
                out = [await c.command("MAIL FROM:<a@client.example>")]
                out.append(await c.command("RCPT TO:<x@example.org>"))
                out.append(await c.command("QUIT"))
                return out

        async def friend_session() -> list[str]:
            async with RawClient(*edge.address, local=friend, timeout=30) as c:
                await c.greet()
                out = [await c.command("MAIL FROM:<a@client.example>")]
                out.append(await c.command("RCPT TO:<x@example.org>"))
                out.append(await c.command("DATA"))
                out.append(await c.command("Subject: t\r\n\r\nhello\r\n."))
                return out

        results = await asyncio.gather(*(stranger() for _ in range(5)), friend_session())
    for mail, rcpt, quit_ in results[:5]:
        assert mail.startswith("250")
        assert rcpt[0] == "4", rcpt  # deferred, Postfix defer_if_permit / 450
        assert quit_.startswith("221")
    assert results[5][1].startswith("250") and results[5][3].startswith("250"), results[5]
