"""The handover protocol between two queues (relay.handover.transfer), in process:
the envelope travels whole, only an authenticated peer gets in, a draining
pod takes nothing, and the sender keeps its copy until the peer said 250."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.handover.transfer import (
    MECHANISM,
    HandedEnvelope,
    HandoverClient,
    HandoverError,
    HandoverServer,
    sign,
)
from relay.queue.format import ACTIVE, DEFERRED, HOLD, read_envelope
from relay.queue.mailparams import MailParams, RecipientParams
from relay.queue.store import Queue

SECRET = b"s3cret-s3cret-s3cret-s3cret"
DATA = b"Subject: hi\r\nMessage-ID: <m1@test>\r\n\r\nbody\r\n.leading dot\r\n"


class Peer:
    def __init__(self, queue: Queue, server: asyncio.Server, receiver: HandoverServer) -> None:
        self.queue = queue
        self.server = server
        self.receiver = receiver
        self.draining = False
        self.queued: list[str] = []

    @property
    def address(self) -> str:
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Peer]:
    queue = Queue(tmp_path / "peer")
    holder: list[Peer] = []
    receiver = HandoverServer(
        queue,
        SECRET,
        hostname=lambda: "peer.test",
        max_size=lambda: 1024 * 1024,
        draining=lambda: holder[0].draining,
        on_queued=lambda qid: holder[0].queued.append(qid),
    )
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    holder.append(Peer(queue, server, receiver))
    yield holder[0]
    server.close()
    await server.wait_closed()
    await queue.close()


async def queued_message(queue: Queue, recipients: list[str], data: bytes = DATA) -> str:
    msg = queue.incoming()
    msg.write(data)
    qid = await msg.commit("alice@example.org", recipients, client="192.0.2.7")
    claim = queue.take_fresh(qid)
    assert claim is not None
    queue.release_sync(claim)
    return qid


async def test_envelope_and_data_arrive_whole(tmp_path: Path, peer: Peer) -> None:
    mine = Queue(tmp_path / "mine", clock=lambda: 1_800_000_000.0)
    try:
        qid = await queued_message(mine, ["a@example.com", "b@example.com", "c@example.com"])
        claim = mine.claim_sync(qid, ACTIVE)
        assert claim is not None
        claim.progress.done["b@example.com"] = "sent"  # delivered before the drain
        client = HandoverClient(peer.address, SECRET)
        await client.connect()
        new_id = await client.send(mine, claim)
        await client.close()
        mine.release_sync(claim)
    finally:
        await mine.close()
    assert peer.queued == [new_id]
    [got] = list(peer.queue.messages())
    assert got.queue_id == new_id
    assert (got.sender, got.all_recipients) == (
        "alice@example.org",
        ["a@example.com", "c@example.com"],
    )
    assert got.arrival == 1_800_000_000.0  # retries and expiry go on from the first arrival
    assert got.client == "192.0.2.7"
    assert peer.queue.read_message_data_sync(new_id) == DATA  # no header added, nothing re-checked


async def test_smtputf8_and_dsn_parameters_travel_with_the_message(
    tmp_path: Path, peer: Peer
) -> None:
    params = MailParams(
        smtputf8=True,
        ret="FULL",
        envid="e1",
        recipients={
            "a@example.com": RecipientParams(("SUCCESS",), "rfc822", "o@example.net"),
            "b@example.com": RecipientParams(("NEVER",)),
        },
    )
    mine = Queue(tmp_path / "mine")
    try:
        msg = mine.incoming()
        msg.write(DATA)
        qid = await msg.commit(
            "alice@example.org", ["a@example.com", "b@example.com"], params=params
        )
        claim = mine.take_fresh(qid)
        assert claim is not None
        claim.progress.done["b@example.com"] = "sent"
        client = HandoverClient(peer.address, SECRET)
        await client.connect()
        new_id = await client.send(mine, claim)
        await client.close()
        mine.release_sync(claim)
    finally:
        await mine.close()
    with (peer.queue.directory / ACTIVE / new_id).open("rb") as f:
        got = read_envelope(f.fileno())
    assert got.params == params.only(["a@example.com"])
    assert got.params.recipients == {"a@example.com": params.recipients["a@example.com"]}


async def test_held_mail_stays_held(tmp_path: Path, peer: Peer) -> None:
    mine = Queue(tmp_path / "mine")
    try:
        qid = await queued_message(mine, ["a@example.com"])
        assert mine.move_sync(qid, HOLD)
        claim = mine.claim_sync(qid, HOLD)
        assert claim is not None
        client = HandoverClient(peer.address, SECRET)
        await client.connect()
        new_id = await client.send(mine, claim, hold=True)
        await client.close()
        mine.release_sync(claim)
    finally:
        await mine.close()
    assert peer.queued == []  # not handed to delivery
    assert os.path.exists(peer.queue.path_of(HOLD, new_id))


async def talk(address: str, lines: list[bytes]) -> list[str]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    replies = [(await reader.readline()).decode()]
    for line in lines:
        writer.write(line + b"\r\n")
        await writer.drain()
        reply = (await reader.readline()).decode()
        replies.append(reply)
        if not reply:
            break
    writer.close()
    return replies


async def test_nothing_without_the_secret(peer: Peer) -> None:
    envelope = HandedEnvelope("X", "a@example.org", ["victim@example.net"], 1.0).encode()
    # No AUTH: refused and disconnected (no open relay for the pod network).
    replies = await talk(peer.address, [b"XENVELOPE " + envelope.encode(), b"DATA"])
    assert replies[1].startswith("530 ") and replies[2] == ""
    # MAIL/RCPT are not even commands here.
    replies = await talk(peer.address, [b"MAIL FROM:<a@example.org>"])
    assert replies[1].startswith("530 ")
    # A wrong answer to the challenge.
    host, port = peer.address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()
    writer.write(f"AUTH {MECHANISM}\r\n".encode())
    challenge = (await reader.readline()).decode()[4:].strip()
    writer.write(sign(b"wrong-secret-wrong-secret", challenge.encode()).encode() + b"\r\n")
    assert (await reader.readline()).startswith(b"535 ")
    assert await reader.readline() == b""
    writer.close()
    # An answer replayed from another session does not fit a fresh challenge.
    old = sign(SECRET, base64.b64encode(b"an old challenge").decode().encode())
    replies = await talk(peer.address, [f"AUTH {MECHANISM}".encode(), old.encode()])
    assert replies[2].startswith("535 ")
    assert list(peer.queue.messages()) == []
    client = HandoverClient(peer.address, b"wrong-secret-wrong-secret")
    with pytest.raises(HandoverError, match="535"):
        await client.connect()


async def test_a_draining_pod_takes_no_handover(tmp_path: Path, peer: Peer) -> None:
    peer.draining = True
    client = HandoverClient(peer.address, SECRET)
    with pytest.raises(HandoverError, match="421"):
        await client.connect()


async def test_sender_keeps_its_copy_when_the_peer_fails(tmp_path: Path, peer: Peer) -> None:
    """The peer's disk fails: no 250, so the message stays queued here."""
    from relay.handover.drain import Drainer, write_order_sync

    mine = Queue(tmp_path / "mine")
    try:
        qid = await queued_message(mine, ["a@example.com"])
        assert mine.move_sync(qid, DEFERRED)
        # The peer cannot store (its incoming/ is not a folder; chmod would not stop root).
        incoming = peer.queue.directory / "incoming"
        incoming.rename(incoming.with_name("incoming.away"))
        incoming.write_text("")
        write_order_sync(mine.directory, [peer.address], ttl=60)
        started: list[bool] = []
        drainer = Drainer(mine, SECRET, on_start=lambda: started.append(True), on_end=lambda: None)
        try:
            assert await drainer.step() == 0
        finally:
            incoming.unlink()
            incoming.with_name("incoming.away").rename(incoming)
        assert started == [True]
        assert [m.queue_id for m in mine.messages()] == [qid]
        assert await drainer.step() == 1  # the disk is back: handed over
        assert list(mine.messages()) == []
        assert len(list(peer.queue.messages())) == 1
        await drainer._close_clients()
    finally:
        await mine.close()


def test_a_drain_order_is_a_lease(tmp_path: Path) -> None:
    """A restarted pod finds no stale drain: an order ends unless it is renewed."""
    from relay.handover.drain import read_order_sync, write_order_sync

    first = write_order_sync(tmp_path, ["a:1"], ttl=60, now=1000.0)
    assert first is not None and first.since == 1000.0
    renewed = write_order_sync(tmp_path, ["a:1", "b:1"], ttl=60, now=1050.0)
    assert renewed is not None and renewed.since == 1000.0  # the drain began at the first ask
    assert read_order_sync(tmp_path, now=1100.0) is not None
    assert read_order_sync(tmp_path, now=1111.0) is None  # not renewed: over
    write_order_sync(tmp_path, ["a:1"], ttl=60, now=1200.0)
    write_order_sync(tmp_path, None, ttl=0, now=1201.0)
    assert read_order_sync(tmp_path, now=1201.0) is None
