"""Poison messages on the delivery side (issue #11, item 3).

A queued envelope may hold what no next hop can be sent: bytes that were not
UTF-8 (kept as surrogate escapes by an older version, or handed over by a
peer). And anything may go wrong mid-conversation. Delivery is total: the
message bounces when it can never go out, or is deferred with backoff, and the
connection to the next hop is always closed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from mrtest.delivery_helpers import FakeClock, Received, make_config, message

from relay.config import NextHop
from relay.delivery import transaction
from relay.delivery.qmgr import Delivery
from relay.dns import Resolver
from relay.queue.store import ACTIVE, DEFERRED, Queue

# What "caf\xe9@..." (Latin-1, not UTF-8) becomes once decoded with surrogateescape.
POISON = "caf\udce9@example.org"


class CountingSink:
    """An aiosmtpd next hop (SMTPUTF8 on) that counts its open connections."""

    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.messages: list[Received] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 Ok"

    async def start(self) -> CountingSink:
        sink = self

        class Counted(SMTP):
            def connection_made(self, transport: Any) -> None:
                sink.open += 1
                sink.opened += 1
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                sink.open -= 1
                super().connection_lost(exc)

        def factory() -> SMTP:
            return Counted(self, hostname="sink.test", decode_data=False, enable_SMTPUTF8=True)

        self.server = await asyncio.get_running_loop().create_server(factory, "127.0.0.2", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def no_connection_left(self) -> bool:
        for _ in range(200):  # the peer's close reaches the server a moment later
            if self.open == 0:
                return True
            await asyncio.sleep(0.01)
        return False


@pytest.fixture
async def sink() -> AsyncIterator[CountingSink]:
    s = await CountingSink().start()
    yield s
    assert s.server is not None
    s.server.close()


@pytest.fixture
async def delivery(tmp_path: Path, sink: CountingSink) -> AsyncIterator[Delivery]:
    clock = FakeClock()
    config = make_config({"example.com": NextHop("127.0.0.2", sink.port, tls="none")})
    queue = Queue(tmp_path / "queue", clock=clock)
    d = Delivery(queue, lambda: config, Resolver(), clock)
    await d.recover()
    yield d
    await d.stop(grace=5)
    await queue.close()


async def queue_poison(queue: Queue, sender: str, recipients: list[str]) -> str:
    """Writes the queue file as an older version or a handover would have: the
    message is committed and waits in active/ for the scan, nobody holds it."""
    msg = queue.incoming()
    msg.write(message())
    qid = await msg.commit(sender, recipients, "192.0.2.1")
    claim = queue.take_fresh(qid)
    assert claim is not None
    queue.release_sync(claim)
    return qid


def files(queue: Queue, state: str) -> list[str]:
    return sorted(os.listdir(queue.directory / state))


async def test_unsendable_sender_bounces_and_leaks_no_connection(
    delivery: Delivery, sink: CountingSink
) -> None:
    queue = delivery.queue
    qid = await queue_poison(queue, POISON, ["b@example.com"])
    for _ in range(3):
        await delivery.process_due()
    assert await sink.no_connection_left()
    # Never sendable: bounced (to no one: the sender is no address), not retried.
    assert qid not in files(queue, ACTIVE) + files(queue, DEFERRED)
    assert sink.messages == []


async def test_unsendable_recipient_bounces_the_others_go_out(
    delivery: Delivery, sink: CountingSink
) -> None:
    queue = delivery.queue
    await queue_poison(queue, "a@example.org", ["caf\udce9@example.com", "b@example.com"])
    await delivery.process_due()
    await delivery.pool.close()  # the one healthy connection waits in the pool for reuse
    assert await sink.no_connection_left()
    assert [m.recipients for m in sink.messages] == [["b@example.com"]]
    assert files(queue, ACTIVE) == files(queue, DEFERRED) == []


async def test_any_error_mid_conversation_defers_with_backoff_and_closes(
    delivery: Delivery, sink: CountingSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(self: Any, chunk: bytes) -> bytes:
        raise RuntimeError("surprise")

    monkeypatch.setattr(transaction.DataEncoder, "feed", explode)
    queue = delivery.queue
    clock = delivery.clock
    assert isinstance(clock, FakeClock)
    qid = await queue_poison(queue, "a@example.org", ["b@example.com"])
    due_times = []
    for _ in range(4):
        await delivery.process_due()
        assert await sink.no_connection_left()
        assert files(queue, ACTIVE) == [] and files(queue, DEFERRED) == [qid]
        due = os.stat(queue.directory / DEFERRED / qid).st_mtime
        assert due > clock()  # waits its backoff: no scan retries it before
        await delivery.process_due()
        assert os.stat(queue.directory / DEFERRED / qid).st_mtime == due
        due_times.append(due - clock())
        clock.now = due
    assert sink.opened == 4  # one connection per attempt, each closed
    assert due_times[-1] > due_times[0]  # the backoff grows with the message's age
    [listed] = list(queue.messages())
    assert listed.attempts == 4 and "surprise" in listed.last_reason
