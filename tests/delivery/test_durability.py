"""kill -9 loses no acknowledged message; a restart delivers each exactly once.

Real processes: `mailrelay run` on 127.0.0.x, Postfix's smtp-source and
aiosmtplib as clients, an aiosmtpd next hop that is down, then up.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
from collections import Counter
from pathlib import Path

import aiosmtplib
from mrtest.peers import AiosmtpdSink, CapturedMessage, smtp_source
from mrtest.relayproc import RelayProcess, next_loopback, wait_until, write_manifests

from relay.queue.store import Queue


def relay_queue_id(data: bytes) -> str:
    """The relay's queue id, from the Received header it added."""
    m = re.search(rb"\r\n\tby \S+ \(\S+\) with E?SMTPS? id ([0-9A-Z]{12})", data)
    assert m, data[:300]
    return m.group(1).decode()


def queued(queue_dir: Path) -> int:
    return len(list(Queue(queue_dir).messages()))


def send_until_killed(
    address: tuple[str, int], rcpt: str, acked: list[str], stop: threading.Event
) -> None:
    """Sends messages with unique Message-Ids one after another; records each 250."""

    async def run() -> None:
        i = 0
        while not stop.is_set():
            mid = f"<kill-{i}@client.test>"
            msg = (
                f"From: a@client.test\r\nTo: x@example.com\r\nMessage-Id: {mid}\r\n\r\nbody {i}\r\n"
            )
            try:
                await aiosmtplib.send(
                    msg,
                    sender="a@client.test",
                    recipients=[rcpt],
                    hostname=address[0],
                    port=address[1],
                    timeout=10,
                    start_tls=False,
                )
            except (aiosmtplib.SMTPException, OSError):
                return  # the relay is gone
            acked.append(mid)
            i += 1

    asyncio.run(run())


def test_sigkill_after_250_then_restart_delivers_exactly_once(tmp_path: Path) -> None:
    sink = AiosmtpdSink(next_loopback())  # its port is reserved; nobody listens yet
    rcpt = f"kill-{tmp_path.name}@example.com"  # ours alone: other sessions may share the host
    manifests = write_manifests(
        tmp_path / "m", next_hop=sink.address, domains={"example.com": "any"}
    )
    relay = RelayProcess(manifests, tmp_path / "relay").start()
    try:
        result = smtp_source(relay.address, count=20, sessions=4, to=rcpt)
        assert result.returncode == 0, result.output
        acked: list[str] = []
        stop = threading.Event()
        sender = threading.Thread(target=send_until_killed, args=(relay.address, rcpt, acked, stop))
        sender.start()
        wait_until(lambda: len(acked) >= 15, 60, "15 acknowledged messages")
        relay.stop(signal.SIGKILL)  # mid-stream: one transaction may be cut off
        stop.set()
        sender.join(30)
        acked_now = list(acked)
        assert queued(relay.queue_dir) >= 20 + len(acked_now)
    finally:
        relay.stop(signal.SIGKILL)

    sink.start()
    restarted = RelayProcess(manifests, tmp_path / "relay").start()
    try:

        def ours() -> list[CapturedMessage]:
            return [m for m in sink.messages if m.recipients == [rcpt]]

        wait_until(lambda: len(ours()) >= 20 + len(acked_now), 60, "every message delivered")
        wait_until(lambda: queued(restarted.queue_dir) == 0, 60, "an empty queue")
        ids = Counter(m.header("Message-Id") for m in ours())
        for mid in acked_now:
            assert ids[mid] == 1, f"{mid} delivered {ids[mid]} times"
        assert all(n == 1 for mid, n in ids.items() if mid and mid.startswith("<kill-"))
        from_source = [m for m in ours() if m.sender == "sender@source.test"]
        assert len({relay_queue_id(m.data) for m in from_source}) == len(from_source) == 20
    finally:
        restarted.stop()
        sink.stop()


def test_two_workers_share_the_queue_without_double_delivery(tmp_path: Path) -> None:
    # a recipient of our own: other test sessions may share this machine
    rcpt = f"workers-{tmp_path.name}@example.com"
    sink = AiosmtpdSink(next_loopback())
    manifests = write_manifests(
        tmp_path / "m", next_hop=sink.address, domains={"example.com": "any"}
    )
    with RelayProcess(manifests, tmp_path / "relay", workers=2) as relay:
        result = smtp_source(relay.address, count=60, sessions=6, to=rcpt)
        assert result.returncode == 0, result.output
        sink.start()  # deferred messages of both workers are now retried by both
        try:
            sink.wait_for(60, 60)
            wait_until(lambda: queued(relay.queue_dir) == 0, 60, "an empty queue")
            ours = [m for m in sink.messages if m.recipients == [rcpt]]
            ids = Counter(relay_queue_id(m.data) for m in ours)
            dups = [i for i, n in ids.items() if n > 1]
            assert len(ours) == 60 and len(ids) == 60, (
                dups,
                [ln for ln in relay.log().splitlines() if any(d in ln for d in dups)],
            )
        finally:
            sink.stop()
